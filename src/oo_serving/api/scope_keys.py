"""What a request's handlers leave in its ASGI scope for the request log (`api/edge.py`)."""

# The user id, once a body has been read and validated (/score, /reward).
USER_ID_KEY = "oo.user_id"
# The id of the API key that was presented (a prefix of its digest, never the key).
KEY_ID_KEY = "oo.key_id"
