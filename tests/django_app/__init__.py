"""A minimal Django project whose only job is to run Django's own contrib migrations against a
pgconcord node (tests/test_migrations.py)."""
