# SPDX-License-Identifier: Apache-2.0
"""haios: a security-hardened execution engine for signed, attested plans.

This package implements contract version 1 (`haios run`, `haios state`).
Importing it does no I/O.
"""

__version__ = "1.0.0"
CONTRACT_VERSION = "1"
