"""A dentist's booking system on fasm: the seed's proof that the approach works on something real.

* ``machine.py``: the clinic as a state machine (weekly hours, appointment types, specific and
  auto-selected slots, payment pre-authorisation, a durable payment timeout, cancellation) and the
  invariants that the tests and the simulation check after every step.
* ``processor.py``: a stand-in card processor that honours idempotency keys, and the executor
  and handlers that connect it to the runtime.
* ``run.py``: the demo, through the Runtime on SQLite: ``python examples/dentist_booking/run.py``.
"""
