"""python -m pyvirt"""
import sys

from pyvirt.cli import main

sys.exit(main())
