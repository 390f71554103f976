"""Armed by simpletuner_lcm.pth at interpreter start-up (not implemented yet). Must stay import-cheap."""
