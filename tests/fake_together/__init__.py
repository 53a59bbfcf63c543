"""A local fake of the Together API (server.py) and archive builders (adapter.py) for tests."""
