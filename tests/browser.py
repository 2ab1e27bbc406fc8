"""Load an HTML page in headless Chromium, as a person would, and say what is broken on it.

The page itself has no script; `check_page` loads a copy with `CHECKER` added before ``</body>``: after the load
event it lists images that did not decode (``complete && naturalWidth > 0``) and tables without body rows, and
writes that into ``<body data-check>``, which ``--dump-dom`` prints. Script errors come from Chromium's console log
on stderr (``Uncaught ...``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECKER = """<script>
window.addEventListener("load", function () {
  var problems = [];
  Array.prototype.forEach.call(document.images, function (img, i) {
    if (!img.complete || img.naturalWidth === 0) problems.push("image " + i + " (" + img.alt + ") is broken");
  });
  Array.prototype.forEach.call(document.querySelectorAll("table"), function (t, i) {
    if (t.querySelectorAll("tbody tr").length === 0) problems.push("table " + i + " has no rows");
  });
  document.body.setAttribute("data-images", String(document.images.length));
  document.body.setAttribute("data-check", problems.length ? problems.join("; ") : "ok");
});
</script>"""


def check_page(html: str, workdir: Path) -> tuple[str, int, list[str]]:
    """``(verdict, images, script errors)``: verdict is ``"ok"`` or the problems found, ``"not loaded"`` if the
    checker never ran."""
    page = workdir / "checked.html"
    page.write_text(html.replace("</body>", CHECKER + "</body>"), encoding="utf-8")
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                             "--v=0", "--virtual-time-budget=3000", f"--user-data-dir={workdir / 'profile'}",
                             "--dump-dom", page.resolve().as_uri()],
                            capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", result.stdout)
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1))) if body else {}
    errors = [line for line in result.stderr.splitlines() if "Uncaught" in line]
    return attrs.get("data-check", "not loaded"), int(attrs.get("data-images", 0)), errors
