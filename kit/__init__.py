"""What both CLIs share, imported by the cloud and the device alike: click conventions (``cli``), flag types and
the one memory flag (``flags``), safe text and the byte/duration formats (``text``), the machine's memory
(``machine``) and the one progress renderer (``progress``).

Standard library and click only (no NumPy, nothing else of mist): the CLIs import it before ``--threads`` has
set the BLAS thread count.
"""
