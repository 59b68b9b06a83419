"""qpo-ray: query-dependent prompt optimisation (QPO, Kong et al. 2025) on Ray.

Importing the package is cheap: heavy engines (vllm, deepspeed) live in their adapter
modules and are imported only when used.
"""

__version__ = "0.1.0"
