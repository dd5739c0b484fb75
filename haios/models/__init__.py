# SPDX-License-Identifier: Apache-2.0
"""Pydantic models for every file haios reads or writes (contract v1).

All models are strict: unknown fields, wrong types and out-of-range values
are refused. Construction validates, so a model built in code is checked
exactly like one parsed from disk. No I/O.
"""
