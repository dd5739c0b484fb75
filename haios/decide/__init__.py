# SPDX-License-Identifier: Apache-2.0
"""Pure decisions over validated models: ordering, limits, policy checks."""
