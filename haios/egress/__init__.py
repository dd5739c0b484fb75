# SPDX-License-Identifier: Apache-2.0
"""Default-deny egress: a step reaches exactly the TCP endpoints its profile names.

The sandbox gives every step its own network namespace. For each endpoint
its (operator-owned) profile allows, the sandbox child creates a listening
socket inside that namespace at the address the step will dial, and hands
the descriptor to the engine; the engine forwards each accepted connection
to the real destination, resolved once from the host at run start.
`docs/adr/0004-egress.md` records the design and what it cannot do;
`threat_model/egress.md` the threats.

One module per concern:

- `endpoints`: the profile's endpoint grammar and the address rules (pure).
- `resolve`: names and `VAULT_ADDR` to destinations, at run start (I/O).
- `limits`: per-step bounds on connections and bytes (in-memory).
- `forward`: the per-step forwarder and its records (threads, sockets).

Importing this package does no I/O.
"""
