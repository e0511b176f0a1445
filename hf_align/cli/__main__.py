import sys

from hf_align.cli import main


sys.exit(main())
