# SPDX-License-Identifier: Apache-2.0
"""The run of a verified plan: step records, the signed state, the scheduler.

- `steps`: one step's record and the table of its legal transitions;
- `keeper`: the run's state document, published atomically and signed;
- `scheduler`: admits ready steps under budget and kill flags, records ends.
"""
