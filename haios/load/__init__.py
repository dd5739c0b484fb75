# SPDX-License-Identifier: Apache-2.0
"""The edge: bytes and paths become typed models here, or are refused."""
