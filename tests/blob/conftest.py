from tests.blob.helpers import store  # noqa: F401  (the fixture)
