"""Identity: users, password hashing, access and refresh tokens, API keys."""
