# SPDX-License-Identifier: Apache-2.0
"""Suite-wide fixtures: the real OpenBao dev server (tests/openbao.py)."""

pytest_plugins = ("tests.openbao",)
