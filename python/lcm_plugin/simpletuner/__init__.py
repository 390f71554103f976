"""The SimpleTuner adapter: `install.py` (the only module that patches SimpleTuner) and `distiller.py`.

Importing this package imports nothing heavy; import `lcm_plugin.simpletuner.install` to patch.
"""
