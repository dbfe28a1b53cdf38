"""A Flask app with no Dockerfile: `cloudlet run deploy --source` detects it and serves it with
gunicorn on $PORT."""

import os

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/")
def hello() -> str:
    return f"Hello from Flask on Cloudlet (revision {os.environ.get('K_REVISION', 'local')})\n"


@app.get("/env")
def env() -> object:
    """The Cloud Run contract's variables, as the container sees them."""
    keys = ("PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION")
    return jsonify({key: os.environ.get(key) for key in keys})
