# SPDX-License-Identifier: Apache-2.0
"""The engine-signed state: atomic publication and verification."""
