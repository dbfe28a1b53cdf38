"""The builder: from a source folder to a container image.

``ignore`` decides which files go into a build context (gcloud's ``.gcloudignore`` and
Docker's ``.dockerignore`` rules), ``detect`` maps a folder without a Dockerfile to a kind of
Python app through an ordered table, ``dockerfile`` writes the Dockerfile for it,
``progress`` follows the engine's build messages (log lines, the current step, the failing
step's output) and ``reference`` checks and makes image names. All of those are pure.
``source`` is the one module here with I/O: it walks the folder, reads what detection needs
and streams the context as a tar archive. Building itself happens in the server
(``controlplane.builds``) through the Docker Engine API.
"""
