"""Messages between keys: a built-in tracked action that delivers an input to another key of the
same keyed runtime, effectively once.

A stf that moves something from one key to another (a transfer debits account A and credits
account B) emits ``Tracked(id, Send(to="acct-B", input=Credit(10)))`` and records the send in
its state like any tracked action, so that ``restore`` re-emits it after a crash. The runtime's
built-in executor submits ``input`` to key ``to`` with the idempotency key
``fasm:msg/<machine>/<from-key>/<action id>`` and feeds back :class:`Delivered` once the receiving
transition is durable, or :class:`Refused` when the receiving stf refused the input. Delivery is
at-least-once across crashes of either side (the send stays in flight until its result is
committed); the receiver remembers the message key durably, with its other idempotency keys but
without their time bound (only ``idempotency_window`` bounds it), so each message is applied
exactly once.
"""

# No ``from __future__ import annotations`` here: ``Send.__module__`` is rewritten to ``fasm``,
# where pydantic could not resolve the string annotation ``I`` of ``Send[YourInput]``.
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, get_origin

from ._machine import type_members

__all__ = ("MESSAGE_PREFIX", "Delivered", "Refused", "Send", "declares_send", "message_key")

I = TypeVar("I")

MESSAGE_PREFIX = "fasm:msg/"
"""The prefix of the idempotency keys messages are delivered with. Submit keys may not start
with ``fasm:``, so a client can never forge (or collide with) a message key."""


@dataclass(frozen=True, slots=True)
class Send(Generic[I]):
    """Deliver ``input`` to the machine instance ``to`` of the same runtime, effectively once.

    Add ``Send`` (or ``Send[YourInput]``) to the machine's tracked-action type and
    :class:`Delivered` and :class:`Refused` to its result type; the runtime provides the
    executor. ``input`` must be of the machine's input type.

    Attributes:
        to: the receiving key.
        input: what the receiving key's stf is given.
    """

    to: str
    input: I


@dataclass(frozen=True, slots=True)
class Delivered:
    """The result of a :class:`Send`: the receiving transition is durable.

    Attributes:
        to: the receiving key.
        seq: the receiving key's sequence number of that transition.
        duplicate: the message had been delivered before (a resend after a crash); it was not
            applied again.
    """

    to: str
    seq: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    """The result of a :class:`Send` the receiver refused: its stf raised (a ``Rejected``, or
    anything else), or the input is not valid for it. Nothing changed at the receiver, so the
    sender may compensate (refund a debit).

    Attributes:
        to: the receiving key.
        reason: what the receiver said (the error's text).
    """

    to: str
    reason: str


def message_key(machine_name: str, from_key: str, action_id: object) -> str:
    """The idempotency key a message is delivered with: unique per machine, sending key and
    action id, so a resend after a crash is recognized by the receiver."""
    return f"{MESSAGE_PREFIX}{machine_name}/{from_key}/{action_id}"


def declares_send(tracked_action: Any) -> bool:
    """Whether a machine's tracked-action type has :class:`Send` (or ``Send[X]``): the machine
    sends messages between keys."""
    return any((get_origin(m) or m) is Send for m in type_members(tracked_action))
