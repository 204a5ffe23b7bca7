"""The one way to define a firmware command: a decorator naming its id, result and states.

    @guest_command(Command.SEND_FINISH, Result, IN_SUPDATE)
    def send_finish(self, guest: GuestContext) -> Result:
        guest.end_session(GuestState.SENT)
        return Result(Status.SUCCESS)

The decorator runs the command under the firmware lock (`FirmwareState._execute`), checks
what the declaration states (platform state; for a guest command the platform WORKING, the
handle, the guest's state, in that order) and turns a `Refusal` or bad input into the
command's result with the command's name before the sentence; the command is logged either
way. The body states only its own rules, one `raise Refusal(...)` each, and the success.
A guest command's public signature takes the handle where the body takes the guest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Concatenate, ParamSpec, TypeVar

from ..status import Command, GuestState, PlatformState
from .guest import GuestContext
from .results import CommandResult
from .state import FirmwareState

S = TypeVar("S", bound=FirmwareState)
P = ParamSpec("P")
R = TypeVar("R", bound=CommandResult)


def platform_command(
    command: Command,
    result: Callable[..., R],
    states: Collection[PlatformState] | None = None,
) -> Callable[[Callable[Concatenate[S, P], R]], Callable[Concatenate[S, P], R]]:
    """A command with no guest handle; `states`: the platform states it runs in (None: any)."""

    def decorate(body: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        @functools.wraps(body)
        def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            def attempt() -> R:
                if states is not None:
                    self._check_platform(states)
                return body(self, *args, **kwargs)

            return self._execute(command, None, result, attempt)

        return run

    return decorate


def guest_command(
    command: Command,
    result: Callable[..., R],
    states: Collection[GuestState],
) -> Callable[
    [Callable[Concatenate[S, GuestContext, P], R]], Callable[Concatenate[S, int, P], R]
]:
    """A command on one guest, by handle; `states`: the guest states it runs in."""

    def decorate(
        body: Callable[Concatenate[S, GuestContext, P], R],
    ) -> Callable[Concatenate[S, int, P], R]:
        @functools.wraps(body)
        def run(self: S, handle: int, /, *args: P.args, **kwargs: P.kwargs) -> R:
            def attempt() -> R:
                return body(self, self._guest(handle, states), *args, **kwargs)

            return self._execute(command, handle, result, attempt)

        return run

    return decorate
