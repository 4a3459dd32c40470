"""GridConv: 3D human pose lifting with grid convolution (Kang et al., AAAI 2023).

The method core is ``gridconv.gridconv`` (torch only); ``models``, ``data``, ``metrics``, ``convert``
and the entry points ``train``, ``eval``, ``infer``, ``reproduce``, ``bench`` build on it.
"""
