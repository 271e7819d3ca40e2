"""`lorajobs server`: the HTTP API (`/v1`), its auth, and the dashboard, over the queue and the
bucket. FastAPI on uvicorn. See `app.create_app`."""
