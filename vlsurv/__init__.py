"""vlsurv: vision-language survival modelling on 3D CT."""

__version__ = "0.1.0"
