"""Settings for the test project. The database comes from the environment (libpq's own variable
names), so no host, role or password is written here: PGHOST, PGPORT, PGDATABASE, PGUSER, and
PGPASSWORD or ~/.pgpass read by libpq itself when the role needs a password."""

from __future__ import annotations

import os

SECRET_KEY = "pgconcord-tests-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.admin",
    "django.contrib.sessions",
    "django.contrib.messages",
]

# What the admin's system checks (run by `migrate`) ask of a project that installs it.
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ["PGHOST"],
        "PORT": os.environ.get("PGPORT", "5432"),
        "NAME": os.environ["PGDATABASE"],
        "USER": os.environ["PGUSER"],
        # No PASSWORD: libpq reads PGPASSWORD or ~/.pgpass when the role needs one.
    }
}
