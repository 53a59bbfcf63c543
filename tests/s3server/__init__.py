"""A real S3 API server (moto) for the tests."""
