"""`python -m csctr.export --workdir=DIR`: writes a run's embedding table.

The implementation lives in csctr/serving/export.py; this module keeps the
command short.
"""

from csctr.serving import export

if __name__ == "__main__":
  export._cli()  # pylint: disable=protected-access
