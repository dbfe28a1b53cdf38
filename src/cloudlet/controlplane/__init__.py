"""The control plane: Knative/Cloud Run resources, their use-cases and the HTTP API.

``services`` holds the use-cases (create, replace, delete, status) over the store;
``api`` is the one place errors become HTTP (Kubernetes ``Status`` bodies).
"""
