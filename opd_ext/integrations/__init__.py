"""Integrations of opd_ext with training frameworks.

Each integration is a submodule imported explicitly, so that ``import opd_ext`` never imports a
framework::

    from opd_ext.integrations.trl import OPDConfig, OPDTrainer   # TRL (docs/trl.md)
"""
