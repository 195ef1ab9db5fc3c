"""The sections of ``python -m bench``, one module each: ``ratios``, ``stages``, ``quick``, ``fastpaths`` (a
package of its four experiments) and ``evalcost``. Each returns its rows and formats its own table."""
