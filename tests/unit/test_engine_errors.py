"""The engine's start errors that are the user's fault say so, and what to fix."""

from cloudlet.runtimes.base import CommandNotRunnable
from cloudlet.runtimes.engine import command_failure

RUNC = (
    "the Docker engine failed POST /v1.41/containers/3db5/start (400): failed to create shim "
    "task: OCI runtime create failed: runc create failed: unable to start container process: "
    "exec: {what}: unknown"
)


def test_a_missing_command_is_the_users_fault_naming_the_flags() -> None:
    error = command_failure(RUNC.format(what='"/nope": stat /nope: no such file or directory'))
    assert isinstance(error, CommandNotRunnable)
    assert error.user_fault and error.status == 400 and error.reason == "ContainerCommandFailed"
    assert 'exec: "/nope": stat /nope: no such file or directory' in error.message
    assert "check --command and --args" in error.message
    assert ": unknown" not in error.message


def test_a_command_that_is_not_executable_is_the_users_fault_too() -> None:
    error = command_failure(RUNC.format(what='"/app/run.sh": permission denied'))
    assert error is not None and "permission denied" in error.message


def test_other_engine_failures_are_not_blamed_on_the_user() -> None:
    assert command_failure("the Docker engine failed POST /x/start (500): no space left") is None
