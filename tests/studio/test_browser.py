"""The studio in a real browser, end to end.

A real `rufus studio serve` subprocess on a fresh database, driven by headless Chromium through
Selenium: the admin opens their login link, creates a pairwise round by uploading a responses file
through the admin page and creates two annotators there; one annotator labels with the mouse, the
other with the keyboard (shortcuts, a better answer, an undo and a skip), each until "All done".
On the way the pages are checked: untrusted text (XSS payloads in a prompt and a response) shows as
text and never runs, and no annotator page names a model. Then the round is exported and the export
must hold exactly the labels made, mapped back through the random A/B order each annotator saw.

The system's chromium and chromedriver are used, given by path, so Selenium Manager never downloads
anything; without them the test skips and says what to install. Nothing leaves 127.0.0.1.

Screenshots (the annotator's item page, the admin's round page, the admin home) are written to
$RUFUS_TEST_ARTIFACTS, default build/test-artifacts/studio/, and copied into docs/images/ when
RUFUS_UPDATE_DOCS_IMAGES=1.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("selenium", reason="selenium not installed: pip install selenium (the dev extra has it)")

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver import Chrome, ChromeOptions  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "apt-get install chromium chromium-driver"
REPO = Path(__file__).resolve().parents[2]
WAIT_S = 20  # longest wait for one page to load (they take well under a second)
SERVER_START_S = 60  # longest wait for the server to answer (a few seconds; more on a busy machine)

ROUND = "pilot round"  # a space, so that every link to the round must quote its name
MODELS = ("sft-ckpt-7f3a", "base-ckpt-9c1e")  # distinctive: they must never appear on an annotator page
XSS_SCRIPT = "<script>window.__xss=1</script>"
XSS_IMG = '<img src=x onerror="window.__xss=2">'

# The uploaded responses file: 4 prompts with 2 responses each, response 0 from MODELS[0], 1 from MODELS[1].
# The last prompt and one of its responses carry XSS payloads.
PROMPTS = [
    {
        "prompt": "Explain in two sentences why the sky is blue.",
        "responses": [
            "Sunlight is scattered by the molecules of the air, and blue light, with its short "
            "wavelength, is scattered much more than red. So blue light reaches our eyes from every "
            "direction of the sky.",
            "The sky is blue because it reflects the colour of the oceans.",
        ],
    },
    {
        "prompt": "Give me a synonym for 'happy', used in a sentence.",
        "responses": ["Sad.", "Cheerful: she was cheerful all day after the good news."],
    },
    {"prompt": "What is 17 + 25?", "responses": ["42", "17 + 25 = 42."]},
    {
        "prompt": f"What does {XSS_SCRIPT} do when a web page shows it without escaping?",
        "responses": [
            "It runs as JavaScript inside the page: the browser executes the script, which sets window.__xss.",
            f"The same as {XSS_IMG}: someone else's code runs in your page. Always escape untrusted text.",
        ],
    },
]
XSS_PROMPT = 3

# What the mouse annotator does per prompt: (index of the better response, or "tie"; strength label).
MOUSE_PLAN = {0: (0, "much"), 1: (1, "not sure"), 2: ("tie", "not sure"), 3: (0, "slightly")}
# The keyboard annotator's better answer (typed into the text box; its u, x, s, m and digits must not
# trigger shortcuts there).
BETTER_ANSWER = (
    "Air molecules scatter short (blue) wavelengths about 5x more than long (red) ones, "
    "so scattered blue light reaches us from all over the sky."
)
CHOICE_TEXT = {"A": "A is better", "B": "B is better", "tie": "About the same", "both_bad": "Both bad"}
CHOICE_KEY = {"A": "1", "B": "2", "tie": "3", "both_bad": "4"}
STRENGTH_KEY = {"not sure": "0", "slightly": "s", "much": "m"}
SCREENSHOTS = {
    "annotator": "studio-annotator.png",
    "admin-round": "studio-admin-round.png",
    "admin": "studio-admin.png",
}


# --- the server ---------------------------------------------------------------------------------


@dataclass
class Studio:
    base: str  # http://127.0.0.1:PORT
    db_path: Path
    admin_url: str  # the admin's login link, as the server printed it on first start


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    """Whether the server answers `url` with 200 (no proxy: the request stays on 127.0.0.1)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # not listening yet, or closed the connection
        return False


def _admin_link(stdout: str) -> str | None:
    """The URL on the line after "admin login" in the server's output, once that line is complete."""
    lines = stdout.split("\n")[:-1]  # the last piece may be a line still being written
    for i, line in enumerate(lines[:-1]):
        if "admin login" in line:
            return lines[i + 1].strip()
    return None


@pytest.fixture
def studio(tmp_path):
    """`rufus studio serve` on a fresh database and a free port, until it answers; stopped at the end."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for attempt in range(3):  # a free port can be taken by someone else before the server binds it
        port = _free_port()
        db_path = tmp_path / f"studio-{attempt}.db"  # fresh: only a new studio prints the admin link
        out_path, err_path = tmp_path / f"server-{attempt}.out", tmp_path / f"server-{attempt}.err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            command = [sys.executable, "-m", "rufus.cli", "studio", "serve", "--db", str(db_path), "--port", str(port)]
            proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=tmp_path, env=env)
        base, admin_url, up = f"http://127.0.0.1:{port}", None, False
        deadline = time.monotonic() + SERVER_START_S
        while not up and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            admin_url = admin_url or _admin_link(out_path.read_text())
            up = admin_url is not None and _answers(f"{base}/login")
        if up:
            break
        _stop(proc)
        logs = f"stdout:\n{out_path.read_text()}\nstderr:\n{err_path.read_text()}"
        if "address already in use" not in logs.lower():
            pytest.fail(f"the studio server did not answer within {SERVER_START_S} s\n{logs}")
    else:
        pytest.fail("the studio server found no free port in 3 attempts")
    assert admin_url.startswith(f"{base}/login?token="), admin_url
    try:
        yield Studio(base, db_path, admin_url)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- the browsers -------------------------------------------------------------------------------


def _start_chromium(profile: str):
    """A headless Chromium driver on a fresh profile, or a skip saying why the browser cannot start."""
    options = ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to read the console
    try:
        driver = Chrome(service=Service(CHROMEDRIVER), options=options)  # a path: no Selenium Manager
    except WebDriverException as e:
        first_line = (e.msg or str(e)).strip().splitlines()[0]
        pytest.skip(f"chromium could not start ({first_line}): check {CHROMIUM} and {CHROMEDRIVER} ({INSTALL_HINT})")
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture
def browser(tmp_path):
    """`browser()` hands out one of three headless Chromium drivers (the admin's and each annotator's),
    each on its own fresh profile, so with its own cookies; all are quit at the end.

    Skips when chromium or chromedriver is missing or the browser cannot start. The first driver is
    started right away (so a skip comes before the server starts); the other two start in the
    background meanwhile, while the server (which takes some seconds to import) starts."""
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            pytest.skip(f"{what} not installed (no {path}): {INSTALL_HINT}")
    profiles = [tempfile.mkdtemp(prefix=f"chromium-{i}-", dir=tmp_path) for i in range(3)]
    first = _start_chromium(profiles[0])
    pool = ThreadPoolExecutor(max_workers=2)
    later = [pool.submit(_start_chromium, profile) for profile in profiles[1:]]
    handed_out = iter([lambda: first] + [future.result for future in later])
    try:
        yield lambda: next(handed_out)()
    finally:
        pool.shutdown(wait=True)
        for driver in [first] + [f.result() for f in later if f.exception() is None]:
            driver.quit()


# --- page helpers -------------------------------------------------------------------------------


def after(driver, action) -> None:
    """Do `action()` (a click or key press that loads a new page) and wait until the new page has
    loaded, its deferred script included (so its key handlers are in place)."""
    old = driver.find_element(By.TAG_NAME, "html")
    action()
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.05)
    wait.until(lambda d: detached(old))
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def detached(element) -> bool:
    """True once `element` has left the page. Selenium's `staleness_of` expects the stale-element
    error only; Chromium, asked while the old document is being torn down, can answer "Node with given
    id does not belong to the document" instead, which means the same."""
    try:
        element.is_enabled()
    except WebDriverException:  # StaleElementReferenceException included
        return True
    return False


def press(driver, *keys) -> None:
    """Keys typed into whatever has the focus (the page body unless a text box was focused)."""
    ActionChains(driver).send_keys(*keys).perform()


def ctrl_enter(driver) -> None:
    ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()


def h1(driver) -> str:
    """The page's heading, or what the page says instead (an error page without one fails readably)."""
    found = driver.find_elements(By.TAG_NAME, "h1")
    return found[0].text if found else f"(no h1 on {driver.current_url}: {driver.page_source[:500]!r})"


def text_of(driver, css: str) -> str:
    """The exact text of an element (textContent: what the server wrote, unescaped once)."""
    return driver.find_element(By.CSS_SELECTOR, css).get_attribute("textContent")


def assert_nothing_ran(driver) -> None:
    """No payload ran and none became markup: no img or script element in the page's main part."""
    assert driver.execute_script("return window.__xss === undefined"), f"XSS ran on {driver.current_url}"
    assert not driver.find_elements(By.CSS_SELECTOR, "main img, main script, main [onerror]")


def assert_clean_console(driver) -> None:
    """No errors in the browser console (a CSP violation or a failed request would be one)."""
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors


def assert_annotator_page(driver) -> None:
    """What every annotator page must hold to: blind to models, and untrusted text stays text."""
    source = driver.page_source
    for model in MODELS:
        assert model not in source, f"model name {model!r} on the annotator page {driver.current_url}"
    assert_nothing_ran(driver)


def read_item(driver, labelled: int) -> tuple[int, dict[str, str]]:
    """On an item page: which prompt it is (index into PROMPTS) and the response text shown as A and
    as B, checking the page on the way."""
    assert_annotator_page(driver)
    assert f"{labelled} labelled by you" in text_of(driver, ".item-head")
    prompt = text_of(driver, ".prompt .turn .text")
    index = next(i for i, p in enumerate(PROMPTS) if p["prompt"] == prompt)
    shown = {letter: text_of(driver, f"#response-{letter} .text") for letter in "AB"}
    assert sorted(shown.values()) == sorted(PROMPTS[index]["responses"])  # both, each once
    assert not driver.find_elements(By.ID, "response-C")
    if index == XSS_PROMPT:  # the payloads are visible as text
        assert XSS_SCRIPT in driver.find_element(By.CSS_SELECTOR, ".prompt .text").text
        assert XSS_IMG in driver.find_element(By.CSS_SELECTOR, ".responses").text
    return index, shown


def letter_of(shown: dict[str, str], text: str) -> str:
    return next(letter for letter, t in shown.items() if t == text)


def assert_selected(driver, choice: str, strength: str) -> None:
    """The radios show the choice and strength, and the chosen response is marked (studio.js)."""
    assert driver.find_element(By.CSS_SELECTOR, f"input[name=choice][value='{choice}']").is_selected()
    value = {"not sure": "", "slightly": "slightly", "much": "much"}[strength]
    assert driver.find_element(By.CSS_SELECTOR, f"input[name=strength][value='{value}']").is_selected()
    cards = driver.find_elements(By.CSS_SELECTOR, ".response.winner")
    winners = [c.get_attribute("data-letter") for c in cards]
    assert winners == ([choice] if choice in "AB" else [])


def table_cells(driver, section: str) -> list[list[str]]:
    """The body cells of the table in the page section headed `section`."""
    rows = driver.find_elements(By.XPATH, f"//section[h2='{section}']//table/tbody/tr")
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in rows]


def on_done_page(driver) -> bool:
    return h1(driver).startswith("All done")


def artifacts_dir() -> Path:
    path = Path(os.environ.get("RUFUS_TEST_ARTIFACTS") or REPO / "build" / "test-artifacts" / "studio")
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(driver, key: str) -> Path:
    """A screenshot of the whole page, 1280 px wide (the viewport is stretched to the page's height
    for it), as a test artefact, and into docs/images/ when RUFUS_UPDATE_DOCS_IMAGES=1."""
    height = 0
    for _ in range(3):  # the page may reflow at the new size; stop once its height holds
        page = driver.execute_script("return document.documentElement.scrollHeight")
        if page == height:
            break
        height = page
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
    path = artifacts_dir() / SCREENSHOTS[key]
    try:
        assert driver.save_screenshot(str(path)), f"could not write {path}"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    if os.environ.get("RUFUS_UPDATE_DOCS_IMAGES") == "1":
        docs = REPO / "docs" / "images"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, docs / SCREENSHOTS[key])
    return path


# --- what the people do -------------------------------------------------------------------------


def create_round_in_admin_page(driver, studio: Studio, responses_file: Path) -> None:
    """Fill the admin page's "New round from a file" form and submit it."""
    driver.find_element(By.ID, "round-name").send_keys(ROUND)
    Select(driver.find_element(By.ID, "round-task")).select_by_value("pairwise")
    per_item = driver.find_element(By.ID, "round-lpi")
    per_item.clear()
    per_item.send_keys("2")
    driver.find_element(By.ID, "round-file").send_keys(str(responses_file))
    after(driver, driver.find_element(By.CSS_SELECTOR, "#new-round button[type=submit]").click)
    assert driver.current_url == f"{studio.base}/admin/rounds/{quote(ROUND, safe='')}"
    assert h1(driver).startswith(ROUND)
    assert "4 items, 2 labels each: 0 of 8 labels given" in driver.find_element(By.TAG_NAME, "main").text


def create_annotator(driver, studio: Studio, name: str, round_name: str) -> str:
    """Create an annotator through the admin page's "New annotator" form; return their login URL."""
    driver.get(f"{studio.base}/admin")
    driver.find_element(By.ID, "annotator-name").send_keys(name)
    Select(driver.find_element(By.ID, "annotator-round")).select_by_value(round_name)  # "" = every round
    after(driver, driver.find_element(By.CSS_SELECTOR, "#new-annotator button[type=submit]").click)
    assert h1(driver) == f"{name} can start"
    url = driver.find_element(By.ID, "login-url").get_attribute("value")
    assert url.startswith(f"{studio.base}/login?token="), url
    return url


def log_in_and_start(driver, studio: Studio, login_url: str) -> None:
    """Open the login link: it starts a session and lands on the annotator's first item, at a URL
    without the token. The annotator's list of rounds is checked on the way."""
    driver.get(login_url)
    item_url = driver.current_url
    assert item_url.startswith(f"{studio.base}/items/") and "token" not in item_url
    assert_annotator_page(driver)
    driver.get(f"{studio.base}/")
    assert h1(driver) == "Your rounds"
    assert_annotator_page(driver)
    after(driver, driver.find_element(By.LINK_TEXT, "Label").click)
    assert driver.current_url == item_url  # the same open item


def label_with_mouse(driver, name: str, made: dict) -> None:
    """Click through MOUSE_PLAN: a choice, a strength, then Submit, until "All done"."""
    for _ in range(3 * len(PROMPTS)):  # bounded: a studio that never says "All done" fails the test
        if on_done_page(driver):
            break
        index, shown = read_item(driver, labelled=sum(k[0] == name for k in made))
        better, strength = MOUSE_PLAN[index]
        choice = "tie" if better == "tie" else letter_of(shown, PROMPTS[index]["responses"][better])
        driver.find_element(
            By.XPATH,
            f"//fieldset[contains(@class, 'choice')]//label[contains(normalize-space(.), '{CHOICE_TEXT[choice]}')]",
        ).click()
        driver.find_element(
            By.XPATH, f"//fieldset[contains(@class, 'strength')]//label[contains(normalize-space(.), '{strength}')]"
        ).click()
        assert_selected(driver, choice, strength)
        if index == 0:
            screenshot(driver, "annotator")
        after(driver, driver.find_element(By.ID, "submit").click)
        made[name, index] = {"choice": choice, "shown": shown, "strength": strength, "better_answer": None}
    assert on_done_page(driver), "the mouse annotator never reached the All done page"


def label_with_keyboard(driver, name: str, made: dict, skipped: list) -> None:
    """Label with the shortcuts only: a choice key (1/2), a strength key (s/m), Enter. On prompt 0 also
    "w", a typed better answer and Ctrl+Enter; prompt 1 is labelled, undone with "u" from the next page
    and labelled again the other way; prompt 2 is skipped with "x"."""
    first_seen: dict[int, dict[str, str]] = {}
    undo_next, undone = False, False
    for _ in range(3 * len(PROMPTS)):
        if undo_next:  # on the page after prompt 1's label: undo it, which reopens prompt 1's item
            assert_annotator_page(driver)
            after(driver, lambda: press(driver, "u"))
            assert text_of(driver, ".prompt .turn .text") == PROMPTS[1]["prompt"], "u reopened another item"
            del made[name, 1]
            undo_next, undone = False, True
            continue
        if on_done_page(driver):
            break
        index, shown = read_item(driver, labelled=sum(k[0] == name for k in made))
        if index == 1 and undone:  # the item reopened by undo keeps the order it was shown in
            assert shown == first_seen[index]
        first_seen[index] = shown
        if index == 2:
            after(driver, lambda: press(driver, "x"))
            skipped.append(index)
            continue
        # prompt 1 first goes to response 0 "much" (then undone), every other label to response 1
        better, strength = (0, "much") if index == 1 and not undone else (1, "slightly")
        choice = letter_of(shown, PROMPTS[index]["responses"][better])
        press(driver, CHOICE_KEY[choice], STRENGTH_KEY[strength])
        assert_selected(driver, choice, strength)
        better_answer = None
        if index == 0:  # "w" opens the extras and focuses the better-answer box; Ctrl+Enter submits
            press(driver, "w")
            assert driver.find_element(By.CSS_SELECTOR, "details.extras").get_attribute("open") is not None
            assert driver.switch_to.active_element.get_attribute("id") == "better_answer"
            press(driver, BETTER_ANSWER)
            assert driver.find_element(By.ID, "better_answer").get_attribute("value") == BETTER_ANSWER
            assert_selected(driver, choice, strength)  # the letters typed in the box changed nothing
            after(driver, lambda: ctrl_enter(driver))
            better_answer = BETTER_ANSWER
        else:
            after(driver, lambda: press(driver, Keys.ENTER))
        made[name, index] = {"choice": choice, "shown": shown, "strength": strength, "better_answer": better_answer}
        undo_next = index == 1 and not undone
    assert on_done_page(driver), "the keyboard annotator never reached the All done page"
    assert undone and skipped == [2]


# --- the test -----------------------------------------------------------------------------------


def test_admin_and_two_annotators_label_a_round_in_a_browser(browser, studio, tmp_path):
    responses_file = tmp_path / "responses.jsonl"
    responses_file.write_text(
        "".join(json.dumps({**p, "models": list(MODELS)}) + "\n" for p in PROMPTS), encoding="utf-8"
    )

    # The admin logs in with the link the server printed, creates the round and two annotators.
    admin = browser()
    admin.get(studio.admin_url)
    assert admin.current_url == f"{studio.base}/admin"
    assert h1(admin) == "Rounds"
    create_round_in_admin_page(admin, studio, responses_file)
    mouse_url = create_annotator(admin, studio, "alice", ROUND)  # only for this round
    keys_url = create_annotator(admin, studio, "bob", "")  # every round

    # Each annotator in a browser of their own (own profile, own cookies).
    made: dict[tuple[str, int], dict] = {}  # (annotator, prompt index) -> the label as made on the page
    skipped: list[int] = []
    alice = browser()
    log_in_and_start(alice, studio, mouse_url)
    label_with_mouse(alice, "alice", made)
    assert "You labelled 4 items" in alice.find_element(By.TAG_NAME, "main").text
    assert_annotator_page(alice)
    assert_clean_console(alice)

    bob = browser()
    log_in_and_start(bob, studio, keys_url)
    label_with_keyboard(bob, "bob", made, skipped)
    assert "You labelled 3 items" in bob.find_element(By.TAG_NAME, "main").text
    assert_annotator_page(bob)
    assert_clean_console(bob)

    # The admin's round page: counts per annotator, the disputed items (prompts 0 and 3, the XSS one,
    # shown as text), then the admin home with the round's progress.
    admin.get(f"{studio.base}/admin/rounds/{quote(ROUND, safe='')}")
    main = admin.find_element(By.TAG_NAME, "main").text
    assert "7 of 8 labels given, 3 items complete" in main
    assert "better answers written: 1" in main
    people = table_cells(admin, "Annotators")
    assert [row[:3] for row in people] == [["alice", "4", "0"], ["bob", "3", "1"]]
    disputed = [row[3] for row in table_cells(admin, "Most disputed items")]
    assert sorted(disputed) == sorted([PROMPTS[0]["prompt"], PROMPTS[XSS_PROMPT]["prompt"]])
    assert_nothing_ran(admin)
    screenshot(admin, "admin-round")
    admin.get(f"{studio.base}/admin")
    assert "7 / 8" in admin.find_element(By.CSS_SELECTOR, "table.grid").text
    assert_nothing_ran(admin)
    screenshot(admin, "admin")
    assert_clean_console(admin)

    # The export holds exactly the labels made: per annotator, chosen = the text shown under the
    # letter picked, rejected = the other one; the tie only with tie=half; the better answer as sft.
    from rufus.studio.db import open_database
    from rufus.studio.export import export_rows, table_rows

    db, _ = open_database(studio.db_path, create=False)
    try:
        ids = {row["name"]: row["annotator_id"] for row in table_rows(db, "annotators")}
        preference = export_rows(db, ROUND, "preference", aggregate="label")
        with_ties = export_rows(db, ROUND, "preference", aggregate="label", tie="half")
        sft = export_rows(db, ROUND, "sft")
        labels = table_rows(db, "labels", ROUND)
        item_prompt = {row["item_id"]: row["prompt"] for row in table_rows(db, "items", ROUND)}
    finally:
        db.dispose()

    expected, ties = [], []
    for (name, index), label in made.items():
        prompt, choice, shown = PROMPTS[index]["prompt"], label["choice"], label["shown"]
        if choice == "tie":
            ties += [(ids[name], prompt, shown["A"], shown["B"]), (ids[name], prompt, shown["B"], shown["A"])]
            continue
        strength = None if label["strength"] == "not sure" else label["strength"]
        other = "B" if choice == "A" else "A"
        expected.append((ids[name], prompt, shown[choice], shown[other], strength))
    got = [(r["annotator_id"], r["prompt"], r["chosen"], r["rejected"], r.get("strength")) for r in preference]
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    assert Counter(r["annotator_id"] for r in preference) == {ids["alice"]: 3, ids["bob"]: 3}
    # the plan, in terms of responses (whatever the A/B order was): bob's re-label of prompt 1 counts
    assert (ids["bob"], PROMPTS[1]["prompt"], PROMPTS[1]["responses"][1], PROMPTS[1]["responses"][0], "slightly") in got
    assert all(r["prompt"] != PROMPTS[2]["prompt"] or r["annotator_id"] == ids["alice"] for r in with_ties)
    tie_rows = [(r["annotator_id"], r["prompt"], r["chosen"], r["rejected"]) for r in with_ties if r.get("tie")]
    assert sorted(tie_rows, key=repr) == sorted(ties, key=repr) and len(tie_rows) == 2
    assert len(with_ties) == len(preference) + 2

    written = [
        (ids[name], PROMPTS[index]["prompt"], label["better_answer"])
        for (name, index), label in made.items()
        if label["better_answer"]
    ]
    assert written == [(ids["bob"], PROMPTS[0]["prompt"], BETTER_ANSWER)]
    assert [(r["annotator_id"], r["prompt"], r["completion"]) for r in sft] == written
    # every stored label is one made on the page (bob's undone label is gone, his skip left none)
    assert sorted((r["annotator_id"], item_prompt[r["item_id"]]) for r in labels) == sorted(
        (ids[name], PROMPTS[index]["prompt"]) for name, index in made
    )
    assert Counter(r["annotator_id"] for r in labels) == {ids["alice"]: 4, ids["bob"]: 3}

    for key in SCREENSHOTS:  # the artefacts are there and are real images
        assert (artifacts_dir() / SCREENSHOTS[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
