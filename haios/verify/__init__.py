# SPDX-License-Identifier: Apache-2.0
"""Signature and attestation checks. Pure: (bytes, trusted keys) -> verified value.

Every function here raises a `VerificationError` subclass or returns what it
verified; none returns a bool.
"""
