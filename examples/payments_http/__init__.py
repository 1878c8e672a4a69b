"""The payments service over HTTP (Starlette + uvicorn) with a card provider in its own
process: see service.py for how to start them."""
