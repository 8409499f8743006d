// A folder chosen or dropped on the upload page goes to the server as one tar archive, which
// it takes as it takes a zip. The archive is made of the files' names and sizes only: their
// bytes are read as the upload sends them, so a folder of gigabytes is packed at once and not
// held in memory. Paths longer than a tar header holds, or not ASCII, go in a pax header
// (POSIX.1-2001), as Python's tarfile writes them.
"use strict";

window.folderTar = (function () {
  const BLOCK = 512;
  const NAME_BYTES = 100; // a ustar header's name field
  const MAX_FILE_BYTES = 8 ** 11 - 1; // what the header's 11 octal digits of size hold
  const encoder = new TextEncoder();
  const ZEROS = new Uint8Array(BLOCK);
  const PLAIN = /^[\x20-\x7e]*$/; // printable ASCII: a name any tar reader reads as written

  function octal(value, width) { // width - 1 digits, then NUL
    return value.toString(8).padStart(width - 1, "0") + "\0";
  }

  function put(block, offset, ascii) {
    for (let i = 0; i < ascii.length; i += 1) block[offset + i] = ascii.charCodeAt(i);
  }

  // What every header holds: mode, owner and group, the checksum's field counted as spaces,
  // the ustar magic and version.
  const TEMPLATE = new Uint8Array(BLOCK);
  put(TEMPLATE, 100, "0000644\0");
  put(TEMPLATE, 108, "0000000\0");
  put(TEMPLATE, 116, "0000000\0");
  put(TEMPLATE, 148, "        ");
  put(TEMPLATE, 257, "ustar\0" + "00");

  // One 512-byte ustar header: regular file ("0") or pax record ("x"); `name` is ASCII of at
  // most NAME_BYTES.
  function header(name, size, mtime, type) {
    const block = TEMPLATE.slice();
    put(block, 0, name);
    put(block, 124, octal(size, 12));
    put(block, 136, octal(mtime, 12));
    put(block, 156, type);
    let sum = 0;
    for (let i = 0; i < BLOCK; i += 1) sum += block[i];
    put(block, 148, octal(sum, 7) + " ");
    return block;
  }

  // The pax record that names a file: "<length> path=<utf-8 path>\n", the length counting
  // its own digits.
  function paxPath(path) {
    const rest = encoder.encode(" path=" + path + "\n").length;
    let length = rest + String(rest).length;
    if (String(length).length + rest !== length) length += 1;
    return encoder.encode(length + " path=" + path + "\n");
  }

  const padding = (size) => ZEROS.subarray(0, (BLOCK - (size % BLOCK)) % BLOCK);

  // entries: [{ path, file }] -> a Blob of the tar archive holding each file at its path.
  // A Blob costs Chromium about 40 µs for each file it refers to (1 s at 10,000 files): the
  // archive is made PACK_STEP files at a time, the page answering between them, and
  // `progress` is told how many are in.
  const PACK_STEP = 2000;
  async function pack(entries, progress) {
    const pieces = [];
    for (let start = 0; start < entries.length; start += PACK_STEP) {
      const parts = [];
      for (const { path, file } of entries.slice(start, start + PACK_STEP)) {
        if (file.size > MAX_FILE_BYTES) {
          throw new Error(path + " is over 8 GiB, more than a tar archive holds for one file");
        }
        const mtime = Math.max(0, Math.floor((file.lastModified || 0) / 1000));
        let name = path;
        if (!PLAIN.test(path) || path.length > NAME_BYTES) {
          const record = paxPath(path);
          parts.push(header("PaxHeader", record.length, mtime, "x"), record, padding(record.length));
          name = path.replace(/[^\x20-\x7e]/g, "_").slice(-NAME_BYTES); // for readers without pax
        }
        parts.push(header(name, file.size, mtime, "0"), file, padding(file.size));
      }
      pieces.push(new Blob(parts));
      if (progress) progress(Math.min(start + PACK_STEP, entries.length));
      await new Promise((done) => setTimeout(done));
    }
    pieces.push(ZEROS, ZEROS); // the end of the archive
    return new Blob(pieces, { type: "application/x-tar" });
  }

  // What an upload skips by its name (app/ingest.py, _skip_reason_by_name): a hidden file or
  // folder (its name starts with ".") and macOS metadata (__MACOSX/). Left out before packing:
  // a project folder's .git/ can hold more files than its images, all sent to be skipped.
  const skippedName = (name) => name.startsWith(".") || name.toLowerCase() === "__macosx";

  // The files to send ({path, file}), and what was left out: each skipped file's path, and
  // each skipped folder's once, with a "/".
  function withoutSkipped(entries, leftOutFolders) {
    const files = [];
    const leftOut = new Set(leftOutFolders || []);
    for (const entry of entries) {
      const parts = entry.path.split("/");
      const at = parts.findIndex(skippedName);
      if (at < 0) files.push(entry);
      else leftOut.add(parts.slice(0, at + 1).join("/") + (at < parts.length - 1 ? "/" : ""));
    }
    return { files, leftOut: Array.from(leftOut) };
  }

  // The files under the entries of a drop (FileSystemEntry: a folder is read through, its
  // entries a batch at a time), each with its path from the name of what was dropped, as
  // `withoutSkipped` gives them (a skipped folder is not read); `progress` is told how many
  // have been found every READ_STEP files.
  const READ_STEP = 500;
  async function filesOf(entries, progress) {
    const found = [];
    const skippedFolders = [];
    const walk = async function (entry) {
      const path = entry.fullPath.replace(/^\/+/, "");
      if (entry.isFile) {
        const file = await new Promise((done, failed) => entry.file(done, failed));
        found.push({ path, file });
        if (progress && found.length % READ_STEP === 0) progress(found.length);
      } else if (entry.isDirectory && skippedName(path.split("/").pop())) {
        skippedFolders.push(path + "/");
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        for (;;) {
          const batch = await new Promise((done, failed) => reader.readEntries(done, failed));
          if (!batch.length) break;
          for (const child of batch) await walk(child);
        }
      }
    };
    for (const entry of entries) await walk(entry);
    return withoutSkipped(found, skippedFolders);
  }

  // The files of an <input webkitdirectory> (their paths start with the folder's name), as
  // `withoutSkipped` gives them.
  const filesChosen = (files) => withoutSkipped(Array.from(files, (file) => ({
    path: file.webkitRelativePath || file.name, file })));

  // What the archive is called: the folder's name when everything is in one (the dataset's
  // name unless one is typed), else "folders".
  function archiveName(entries) {
    const tops = new Set(entries.map(({ path }) => (path.includes("/") ? path.split("/")[0] : "")));
    const [top] = tops;
    return (tops.size === 1 && top ? top : "folders") + ".tar";
  }

  return { pack, filesOf, filesChosen, archiveName };
})();
