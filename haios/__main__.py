# SPDX-License-Identifier: Apache-2.0
"""`python -m haios`: the same entry point as the `haios` console script."""

from haios.cli.main import console

console()
