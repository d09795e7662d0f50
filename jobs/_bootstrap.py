"""Make `import lmforge` work for a job started from a checkout (e.g. `ray job submit
--working-dir .`), where lmforge is shipped as source rather than installed: the shipped
source comes first, so a job runs the code it was submitted with."""

import os
import sys

_src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform")
if os.path.isdir(os.path.join(_src, "lmforge")) and _src not in sys.path:
    sys.path.insert(0, _src)
