# SPDX-License-Identifier: Apache-2.0
"""Suite-wide fixtures: the real OpenBao dev server (tests/support/openbao.py)."""

pytest_plugins = ("tests.support.openbao",)
