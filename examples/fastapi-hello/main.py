"""A FastAPI app with no Dockerfile: `cloudlet run deploy --source` detects it and serves it
with uvicorn on $PORT."""

import os

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def hello() -> dict[str, str]:
    return {
        "message": "Hello from FastAPI on Cloudlet",
        "revision": os.environ.get("K_REVISION", "local"),
    }


@app.get("/items/{item_id}")
def item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}
