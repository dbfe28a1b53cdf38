"""Security: who may invoke a service, and what a service may read.

``keys`` keeps the server's key files (created once, mode 0600, in CLOUDLET_HOME/keys —
a directory apart from the database); ``tokens`` mints and verifies identity tokens
(Ed25519-signed JWTs); ``access`` is the router's invoker and ingress check, fed by the
controller; ``secrets`` stores secret versions encrypted with AES-GCM and resolves them
at instance start. Nothing here touches the router's sockets or the container engine.
"""
