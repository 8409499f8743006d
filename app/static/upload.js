// Dataset pages: drag-and-drop upload with a progress bar, and deleting a dataset.
"use strict";

(function () {
  // The units of the server's own messages (app.responses.human_bytes), so the page's "this
  // file is 4.2 GiB" and the server's "the upload limit of 4.0 GiB" compare.
  function formatBytes(count) {
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let unit = 0;
    while (count >= 1024 && unit < units.length - 1) {
      count /= 1024;
      unit += 1;
    }
    return unit === 0 ? count + " bytes" : count.toFixed(1) + " " + units[unit];
  }

  // A 401 on an open page: the sign-in expired (or the token changed). The server's text is
  // for API clients; a person gets a link to sign in again that comes back to this page.
  function signInAgain(then) {
    const link = document.createElement("a");
    link.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    link.className = "sign-in-again";
    link.textContent = "sign in again";
    return ["Your sign-in expired: ", link, then];
  }

  // The API answers {"detail": "..."}; FastAPI validation errors give a list instead.
  function errorText(status, body) {
    let parsed = null;
    try {
      parsed = JSON.parse(body);
    } catch (err) {
      parsed = null;
    }
    const detail = parsed && parsed.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map(function (item) { return item.msg || JSON.stringify(item); }).join("; ");
    }
    if (status === 413) return "The archive is too large for this server.";
    return "The upload failed (HTTP " + status + ").";
  }

  function setUpUpload(form) {
    const input = form.querySelector("#file");
    const dropzone = form.querySelector("#dropzone");
    const chosen = form.querySelector("#chosen");
    const button = form.querySelector("#upload-button");
    const progressBox = form.querySelector("#upload-progress");
    const bar = form.querySelector("#progress-bar");
    const progressText = form.querySelector("#progress-text");
    const errorBox = form.querySelector("#upload-error");
    const maxBytes = Number(form.dataset.maxBytes || 0);
    const maxFiles = Number(form.dataset.maxFiles || 0);
    const folderInput = form.querySelector("#folder");
    let file = null;

    // message: a text, or a list of texts and nodes (a link).
    function showError(message) {
      errorBox.replaceChildren(...[].concat(message));
      errorBox.hidden = !message;
    }

    // What the upload sends: an archive, or a folder's files packed into one (`described`).
    // A folder takes a while to read and pack (seconds at 100,000 files): what is chosen
    // meanwhile wins, and the folder's turn (`folderTurn`) is over.
    let turns = 0;
    let folderPending = false; // a folder is being read or packed
    function choose(candidate, described) {
      turns += 1;
      folderPending = false;
      file = candidate || null;
      chosen.textContent = !file ? "" : described || file.name + " (" + formatBytes(file.size) + ")";
      showError("");
      if (file && maxBytes && file.size > maxBytes) {
        showError(tooLarge(described ? "This folder is" : "This file is", file.size,
          described ? "folders" : "archives"));
      }
    }

    // What is over the server's size limit: "This file is 5.0 GiB; ... smaller archives."
    function tooLarge(subject, size, pieces) {
      return subject + " " + formatBytes(size) + "; the server accepts at most " +
        formatBytes(maxBytes) + ". Split it into smaller " + pieces + ".";
    }

    // A folder's turn: what is chosen so far is let go; while it is still the folder's turn
    // (`current()`), `say` tells how it goes and `fail` why it ended without an archive.
    function folderTurn() {
      input.value = ""; // an archive chosen before is not what goes
      choose(null);
      folderPending = true;
      const turn = turns;
      const current = function () { return turn === turns; };
      return {
        current,
        say: function (text) { if (current()) chosen.textContent = text; },
        fail: function (message) {
          if (!current()) return;
          folderPending = false;
          chosen.textContent = "";
          showError(message);
        },
      };
    }

    const counted = function (n) { return n.toLocaleString("en-US"); };

    // What an upload skips by name, left out of a folder before packing: the first few.
    function leftOutText(leftOut) {
      const shown = leftOut.slice(0, 3).join(", ");
      return leftOut.length > 3 ? shown + " and " + counted(leftOut.length - 3) + " more" : shown;
    }

    // A folder's files ({path, file}), sent as one tar archive (folder_tar.js), and what was
    // left out of it (`leftOut`: hidden files and folders, macOS metadata).
    async function chooseFolder({ files: entries, leftOut }, turn) {
      if (!entries.length) {
        turn.fail(leftOut.length
          ? "The folder holds only hidden files or folders (" + leftOutText(leftOut) +
            "), which an upload skips: choose the folder of your images."
          : "The folder holds no file: choose the folder of your images.");
        return;
      }
      // The server's limits, told before the folder is packed and sent, not after.
      if (maxFiles && entries.length > maxFiles) {
        turn.fail("This folder holds " + counted(entries.length) + " files; the server accepts " +
          "at most " + counted(maxFiles) + " in one upload. Split it into smaller folders.");
        return;
      }
      const bytes = entries.reduce(function (sum, entry) { return sum + entry.file.size; }, 0);
      if (maxBytes && bytes > maxBytes) {
        turn.fail(tooLarge("This folder's files are", bytes, "folders"));
        return;
      }
      let archive;
      try {
        archive = await window.folderTar.pack(entries, function (packed) {
          turn.say("Packing the folder… " + counted(packed) + " of " + counted(entries.length) + " files");
        });
      } catch (err) {
        turn.fail(err.message);
        return;
      }
      if (!turn.current()) return;
      const name = window.folderTar.archiveName(entries);
      const packed = new File([archive], name, { type: "application/x-tar" });
      choose(packed, name.replace(/\.tar$/, "") + "/: " + counted(entries.length) +
        (entries.length === 1 ? " file, " : " files, ") + formatBytes(packed.size) +
        ", sent as one tar archive" + (leftOut.length
          ? "; left out, as an upload skips them: " + leftOutText(leftOut) : ""));
    }

    input.addEventListener("change", function () {
      folderInput.value = "";
      choose(input.files[0]);
    });
    folderInput.addEventListener("change", function () {
      const turn = folderTurn();
      chooseFolder(window.folderTar.filesChosen(folderInput.files), turn);
    });
    ["dragenter", "dragover"].forEach(function (name) {
      dropzone.addEventListener(name, function (event) {
        event.preventDefault();
        dropzone.classList.add("over");
      });
    });
    ["dragleave", "drop"].forEach(function (name) {
      dropzone.addEventListener(name, function (event) {
        event.preventDefault();
        dropzone.classList.remove("over");
      });
    });
    dropzone.addEventListener("drop", function (event) {
      // A folder among what was dropped: everything dropped goes, packed. The entries are
      // taken now; the drop's data is gone once its event has been handled.
      const items = event.dataTransfer ? Array.from(event.dataTransfer.items || []) : [];
      const entries = items.map(function (item) {
        return item.kind === "file" && item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
      }).filter(Boolean);
      if (entries.some(function (entry) { return entry.isDirectory; })) {
        folderInput.value = "";
        const turn = folderTurn();
        turn.say("Reading the folder…");
        window.folderTar.filesOf(entries, function (found) {
          turn.say("Reading the folder… " + counted(found) + " files");
        }).then(function (found) {
          if (turn.current()) chooseFolder(found, turn);
        }, function (err) {
          turn.fail("The folder could not be read: " + err.message);
        });
        return;
      }
      const files = event.dataTransfer && event.dataTransfer.files;
      if (files && files.length) {
        folderInput.value = "";
        try {
          input.files = files;  // keeps the native input in step where browsers allow it
        } catch (err) {
          // Older browsers refuse; the dropped file is still used below.
        }
        choose(files[0]);
      }
    });

    // An upload can be stopped; leaving the page while one runs asks first.
    let uploading = null;
    const cancelled = document.getElementById("upload-cancelled");
    const said = document.getElementById("upload-said");
    let saidPercent = 0;
    form.querySelector("#upload-cancel").addEventListener("click", function () {
      if (uploading) uploading.abort();
    });
    window.addEventListener("beforeunload", function (event) {
      if (!uploading) return;
      event.preventDefault();
      event.returnValue = "";  // older browsers ask only when this is set
    });
    // Back from the new dataset's page, the browser may show this page as it was left ("Done.",
    // Upload greyed): it is ready for the next archive instead.
    window.addEventListener("pageshow", function (event) {
      if (!event.persisted || uploading) return;
      progressBox.hidden = true;
      button.disabled = false;
      said.textContent = "";
    });

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (!file) {
        showError(folderPending ? "The folder is still being packed: press Upload again once its size shows."
          : "Choose or drop a folder or an archive first.");
        return;
      }
      if (maxBytes && file.size > maxBytes) return;
      const data = new FormData();
      data.append("file", file, file.name);
      const name = form.querySelector("#name").value.trim();
      if (name) data.append("name", name);

      // The keyboard on Cancel upload while the upload runs (Upload turns off), and back on
      // Upload when it stops: Chromium put it on <body> as each button went.
      const stopped = function () {
        const hadFocus = progressBox.contains(document.activeElement);
        progressBox.hidden = true;
        button.disabled = false;
        if (hadFocus) button.focus();
      };
      const request = new XMLHttpRequest();
      uploading = request;
      request.onloadend = function () { uploading = null; };
      request.onabort = function () {
        stopped();
        cancelled.hidden = false;  // the server keeps nothing of an upload cut short
        said.textContent = cancelled.textContent;
      };
      request.open("POST", "/api/datasets");
      request.setRequestHeader("Accept", "application/json");
      request.upload.onprogress = function (progress) {
        if (!progress.lengthComputable) return;
        const percent = Math.floor((100 * progress.loaded) / progress.total);
        bar.value = percent;
        progressText.textContent = "Uploading: " + formatBytes(progress.loaded) + " of " +
          formatBytes(progress.total) + " (" + percent + " %)";
        if (percent >= saidPercent + 25) {
          saidPercent = percent - (percent % 25);
          said.textContent = "Uploading: " + saidPercent + " %";
        }
      };
      request.upload.onload = function () {
        bar.removeAttribute("value");  // indeterminate while the server verifies
        progressText.textContent = "Uploaded. Checking every image…";
        said.textContent = progressText.textContent;
      };
      request.onload = function () {
        if (request.status === 201) {
          const dataset = JSON.parse(request.responseText);
          progressText.textContent = "Done.";
          said.textContent = "Done. Opening the dataset…";
          uploading = null;  // onloadend comes after this: leaving now must not ask first
          window.location.assign("/datasets/" + dataset.id);
          return;
        }
        stopped();
        showError(request.status === 401 ? signInAgain(", then upload the archive once more.")
          : errorText(request.status, request.responseText));
      };
      request.onerror = function () {
        stopped();
        showError("The connection broke during the upload. Check the server and try again.");
      };
      showError("");
      cancelled.hidden = true;
      bar.value = 0;
      progressText.textContent = "Starting…";
      said.textContent = "Uploading.";
      saidPercent = 0;
      const fromButton = document.activeElement === button;
      progressBox.hidden = false;
      button.disabled = true;
      if (fromButton) form.querySelector("#upload-cancel").focus();
      request.send(data);
    });
  }

  const plural = function (count, noun) { return count + " " + noun + (count === 1 ? "" : "s"); };

  // A JSON read of the API; a refusal throws an Error with its status and the server's text.
  async function readJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (response.ok) return response.json();
    const error = new Error(errorText(response.status, await response.text()));
    error.status = response.status;
    throw error;
  }

  const GONE = "This dataset no longer exists: it was deleted.";

  // The question before a dataset is deleted, with what goes with it as it is now (an
  // experiment started on it in another tab since this page loaded counts). Where the count
  // cannot be read, a question that says so; where the dataset is gone or the sign-in
  // expired, no question: {refusal} says why.
  async function deleteQuestion(button) {
    const id = button.dataset.datasetId;
    const name = "“" + button.dataset.datasetName + "”";
    const undone = " This cannot be undone.";
    let experiments;
    try {
      [, experiments] = await Promise.all([
        readJSON("/api/datasets/" + id),
        readJSON("/api/experiments?dataset_id=" + id),
      ]);
    } catch (error) {
      if (error.status === 401) return { refusal: signInAgain(", then delete it.") };
      if (error.status === 404) return { refusal: GONE };
      console.warn("could not count what the dataset's delete takes with it:", error.message);
      return { question: "Delete " + name + " with every experiment and run made on it, " +
        "their trained models, checkpoints and downloads? (How many there are now could not " +
        "be checked.)" + undone };
    }
    if (!experiments.length) return { question: "Delete " + name + " and its images?" + undone };
    const runs = experiments.reduce(function (sum, experiment) {
      return sum + Object.values(experiment.run_counts).reduce(function (a, b) { return a + b; }, 0);
    }, 0);
    return { question: "Delete " + name + " with its " + plural(experiments.length, "experiment") +
      " and " + plural(runs, "run") + ", their trained models, checkpoints and downloads?" + undone };
  }

  function setUpDelete(button) {
    const errorBox = document.getElementById("delete-error");
    function showError(message) {
      errorBox.replaceChildren(...[].concat(message));
      errorBox.hidden = false;
    }
    let asking = false;  // a second click while the count is read asks nothing more
    // Off while the delete is under way: aria-disabled, so that the keyboard stays on it, and
    // on it still when a refusal is said.
    let deleting = false;
    function inFlight(state) {
      deleting = state;
      button.setAttribute("aria-disabled", String(state));
    }
    button.addEventListener("click", async function () {
      if (asking || deleting) return;
      asking = true;
      errorBox.hidden = true;
      const { question, refusal } = await deleteQuestion(button);
      asking = false;
      if (refusal) showError(refusal);
      if (refusal || !window.confirm(question)) return;
      inFlight(true);
      const request = new XMLHttpRequest();
      request.open("DELETE", button.dataset.deleteUrl);
      request.onload = function () {
        if (request.status === 204) {
          window.location.assign("/datasets");
          return;
        }
        inFlight(false);
        showError(request.status === 401 ? signInAgain(", then delete it.")
          : errorText(request.status, request.responseText));
      };
      request.onerror = function () {
        inFlight(false);
        showError("The server did not answer.");
      };
      request.send();
    });

    // Back or Forward to this page kept by the browser (its back/forward cache) shows it as it
    // was left, with no load: after its Delete (which then opened the list), Delete greyed and
    // Start an experiment offered for a dataset that is gone. It reads the dataset again and,
    // gone, says so and offers neither (as charts.js onRestored does on the other pages).
    window.addEventListener("pageshow", async function (event) {
      if (!event.persisted) return;
      try {
        await readJSON("/api/datasets/" + button.dataset.datasetId);
      } catch (error) {
        if (error.status !== 404) return; // unknown: the Delete's own read says more
        button.hidden = true;
        document.getElementById("start-experiment").hidden = true;
        showError(GONE);
        return;
      }
      inFlight(false);
      errorBox.hidden = true;
    });
  }

  const form = document.getElementById("upload-form");
  if (form) setUpUpload(form);
  document.querySelectorAll("[data-delete-url]").forEach(setUpDelete);
})();
