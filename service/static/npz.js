// Reading and writing .npz archives (zip files of .npy arrays) in the browser.
//
// Reading: stored and deflated members (numpy.savez and numpy.savez_compressed), zip64 records
// (numpy writes them), npy format versions 1 to 3; numeric, boolean and string dtypes. Object
// arrays (pickles) are refused. Deflated members go through the browser's own
// DecompressionStream("deflate-raw").
// Writing: an uncompressed ("stored") archive, as numpy.savez writes it, with CRC-32s.

const utf8 = new TextDecoder();
const ascii = new TextEncoder();

export class NpzError extends Error {
  constructor(message) {
    super(message);
    this.name = "NpzError";
  }
}

/** Whether the bytes start like a zip archive (a local file header, or an empty archive). */
export function isZip(bytes) {
  return bytes.length >= 4 && bytes[0] === 0x50 && bytes[1] === 0x4b && (bytes[2] === 3 || bytes[2] === 5);
}

function u64(dv, offset) {
  const v = dv.getBigUint64(offset, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new NpzError("the archive is too large to read in a browser");
  return Number(v);
}

/** The members of a zip archive: [{name, flags, method, crc, compSize, size, dataOffset}]. */
export function listZip(buffer) {
  const bytes = new Uint8Array(buffer);
  const dv = new DataView(buffer);
  const need = (ok, what) => {
    if (!ok) throw new NpzError(`not a readable npz (zip) archive: ${what}`);
  };
  need(bytes.length >= 22, "too short");
  let eocd = -1;
  for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 0xffff); i--) {
    if (dv.getUint32(i, true) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  need(eocd >= 0, "no end-of-central-directory record");
  let count = dv.getUint16(eocd + 10, true);
  let cdOffset = dv.getUint32(eocd + 16, true);
  if (count === 0xffff || cdOffset === 0xffffffff || dv.getUint32(eocd + 12, true) === 0xffffffff) {
    const locator = eocd - 20;
    need(locator >= 0 && dv.getUint32(locator, true) === 0x07064b50, "no zip64 locator");
    const z = u64(dv, locator + 8);
    need(z + 56 <= bytes.length && dv.getUint32(z, true) === 0x06064b50, "no zip64 end record");
    count = u64(dv, z + 32);
    cdOffset = u64(dv, z + 48);
  }
  const entries = [];
  let p = cdOffset;
  for (let n = 0; n < count; n++) {
    need(p + 46 <= bytes.length && dv.getUint32(p, true) === 0x02014b50, "corrupt central directory");
    const flags = dv.getUint16(p + 8, true);
    const method = dv.getUint16(p + 10, true);
    const crc = dv.getUint32(p + 16, true);
    let compSize = dv.getUint32(p + 20, true);
    let size = dv.getUint32(p + 24, true);
    const nameLen = dv.getUint16(p + 28, true);
    const extraLen = dv.getUint16(p + 30, true);
    const commentLen = dv.getUint16(p + 32, true);
    let local = dv.getUint32(p + 42, true);
    const name = utf8.decode(bytes.subarray(p + 46, p + 46 + nameLen));
    let e = p + 46 + nameLen;
    const extraEnd = e + extraLen;
    while (e + 4 <= extraEnd) {
      const id = dv.getUint16(e, true);
      const len = dv.getUint16(e + 2, true);
      if (id === 0x0001) {
        let q = e + 4;
        if (size === 0xffffffff) { size = u64(dv, q); q += 8; }
        if (compSize === 0xffffffff) { compSize = u64(dv, q); q += 8; }
        if (local === 0xffffffff) { local = u64(dv, q); q += 8; }
      }
      e += 4 + len;
    }
    need(local + 30 <= bytes.length && dv.getUint32(local, true) === 0x04034b50, `no local header for ${name}`);
    const dataOffset = local + 30 + dv.getUint16(local + 26, true) + dv.getUint16(local + 28, true);
    need(dataOffset + compSize <= bytes.length, `${name} is truncated`);
    entries.push({ name, flags, method, crc, compSize, size, dataOffset });
    p = extraEnd + commentLen;
  }
  return entries;
}

/** A member's bytes, decompressed. */
async function memberBytes(buffer, entry) {
  if (entry.flags & 1) throw new NpzError(`${entry.name} is encrypted`);
  const raw = new Uint8Array(buffer, entry.dataOffset, entry.compSize);
  if (entry.method === 0) return raw;
  if (entry.method !== 8) throw new NpzError(`${entry.name} uses zip compression method ${entry.method}; only stored and deflate are read`);
  const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  const out = new Uint8Array(await new Response(stream).arrayBuffer());
  if (out.length !== entry.size) throw new NpzError(`${entry.name} decompressed to ${out.length} bytes, not ${entry.size}`);
  return out;
}

const arrayName = (member) => (member.endsWith(".npy") ? member.slice(0, -4) : member);

/**
 * Read an npz. Returns {names: every array's name, arrays: {name: parsed array}} with only the
 * arrays named in `wanted` parsed (all when it is omitted).
 */
export async function readNpz(buffer, wanted = null) {
  const entries = listZip(buffer);
  const names = entries.map((e) => arrayName(e.name));
  const arrays = {};
  for (const entry of entries) {
    const name = arrayName(entry.name);
    if (wanted && !wanted.includes(name)) continue;
    arrays[name] = parseNpy(await memberBytes(buffer, entry), name);
  }
  return { names, arrays };
}

function parseDescr(descr, name) {
  const m = /^([<>|=]?)([biufcUSV])(\d+)$/.exec(descr);
  if (!m) throw new NpzError(`${name}: dtype ${JSON.stringify(descr)} is not supported (structured or object arrays are never read)`);
  const [, order, kind, n] = m;
  const count = Number(n);
  return { order: order || "=", kind, size: kind === "U" ? 4 * count : count, chars: count };
}

/** Parse one .npy: {name, descr, dtype, shape, fortran, data: Uint8Array, npy: Uint8Array (the whole file)}. */
export function parseNpy(bytes, name) {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
  if (bytes.length < 10 || magic.some((b, i) => bytes[i] !== b)) throw new NpzError(`${name} is not an .npy array`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  let headerLen;
  let start;
  if (major === 1) {
    headerLen = dv.getUint16(8, true);
    start = 10;
  } else if (major === 2 || major === 3) {
    headerLen = dv.getUint32(8, true);
    start = 12;
  } else {
    throw new NpzError(`${name}: .npy format version ${major} is not supported`);
  }
  const header = utf8.decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(header);
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header);
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeText) throw new NpzError(`${name}: unreadable .npy header ${header.trim()}`);
  const shape = shapeText[1].split(",").map((s) => s.trim()).filter((s) => s.length).map(Number);
  if (shape.some((d) => !Number.isSafeInteger(d) || d < 0)) throw new NpzError(`${name}: bad shape (${shapeText[1]})`);
  const dtype = parseDescr(descr[1], name);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLen;
  const nbytes = count * dtype.size;
  if (bytes.length - offset < nbytes) throw new NpzError(`${name}: the header declares ${nbytes} bytes of data, the file holds ${bytes.length - offset}`);
  return {
    name,
    descr: descr[1],
    dtype,
    shape,
    fortran: fortran[1] === "True",
    count,
    data: bytes.subarray(offset, offset + nbytes),
    npy: bytes,
  };
}

const littleEndianHost = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** A numeric or boolean array's values as a Float64Array, in C (row-major) order. */
export function numbers(arr) {
  const { kind, size, order } = arr.dtype;
  const little = order === "<" || order === "|" || (order === "=" && littleEndianHost);
  const dv = new DataView(arr.data.buffer, arr.data.byteOffset, arr.data.byteLength);
  const out = new Float64Array(arr.count);
  const read = {
    b1: (o) => dv.getUint8(o),
    u1: (o) => dv.getUint8(o),
    i1: (o) => dv.getInt8(o),
    u2: (o) => dv.getUint16(o, little),
    i2: (o) => dv.getInt16(o, little),
    u4: (o) => dv.getUint32(o, little),
    i4: (o) => dv.getInt32(o, little),
    u8: (o) => Number(dv.getBigUint64(o, little)),
    i8: (o) => Number(dv.getBigInt64(o, little)),
    f2: (o) => float16(dv.getUint16(o, little)),
    f4: (o) => dv.getFloat32(o, little),
    f8: (o) => dv.getFloat64(o, little),
  }[kind + size];
  if (!read) throw new NpzError(`${arr.name}: dtype ${arr.descr} is not numeric`);
  for (let i = 0, o = 0; i < arr.count; i++, o += size) out[i] = read(o);
  if (arr.fortran && arr.shape.length === 2) {
    const [rows, cols] = arr.shape;
    const c = new Float64Array(arr.count);
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) c[i * cols + j] = out[j * rows + i];
    return c;
  }
  return out;
}

function float16(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** A 0-d (or one-element) numeric array's value. */
export function scalar(arr) {
  return numbers(arr)[0];
}

/** A string array's values (numpy's U: UTF-32, or S: bytes), trailing NULs removed. */
export function strings(arr) {
  const { kind, size, order } = arr.dtype;
  const out = [];
  if (kind === "U") {
    const little = order !== ">";
    const dv = new DataView(arr.data.buffer, arr.data.byteOffset, arr.data.byteLength);
    for (let i = 0; i < arr.count; i++) {
      const points = [];
      for (let o = i * size; o < (i + 1) * size; o += 4) {
        const cp = dv.getUint32(o, little);
        if (cp === 0) break;
        points.push(cp);
      }
      out.push(String.fromCodePoint(...points));
    }
  } else if (kind === "S") {
    for (let i = 0; i < arr.count; i++) {
      let chunk = arr.data.subarray(i * size, (i + 1) * size);
      const nul = chunk.indexOf(0);
      if (nul >= 0) chunk = chunk.subarray(0, nul);
      out.push(utf8.decode(chunk));
    }
  } else {
    throw new NpzError(`${arr.name} must be an array of strings; got dtype ${arr.descr}`);
  }
  return out;
}

/** The bytes of an .npy file (format 1.0, C order) holding `data` with numpy dtype `descr`. */
export function npyBytes(descr, shape, data) {
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(", ");
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${dims}), }`;
  const pad = (64 - ((10 + header.length + 1) % 64)) % 64;
  header += " ".repeat(pad) + "\n";
  const head = ascii.encode(header);
  const view = data instanceof Uint8Array ? data : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const out = new Uint8Array(10 + head.length + view.length);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0], 0);
  new DataView(out.buffer).setUint16(8, head.length, true);
  out.set(head, 10);
  out.set(view, 10 + head.length);
  return out;
}

const CRC_TABLE = (() => {
  const t = new Int32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c;
  }
  return t;
})();

/** CRC-32 of the bytes; yields to the event loop every 4 MiB so that big inputs never freeze the page. */
export async function crc32(bytes) {
  const CHUNK = 1 << 22;
  let c = -1;
  for (let start = 0; start < bytes.length; start += CHUNK) {
    const end = Math.min(bytes.length, start + CHUNK);
    for (let i = start; i < end; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    if (end < bytes.length) await new Promise((resolve) => setTimeout(resolve, 0));
  }
  return (c ^ -1) >>> 0;
}

/** An uncompressed zip archive (as numpy.savez writes) of [{name, bytes}], as a Blob. */
export async function zipStored(files) {
  const parts = [];
  const central = [];
  let offset = 0;
  for (const { name, bytes } of files) {
    if (bytes.length >= 0xffffffff || offset >= 0xffffffff) throw new NpzError("the archive would need zip64 (over 4 GB)");
    const nameBytes = ascii.encode(name);
    const crc = await crc32(bytes);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true);
    local.setUint16(4, 20, true); // version needed
    local.setUint16(12, 33, true); // date: 1980-01-01
    local.setUint32(14, crc, true);
    local.setUint32(18, bytes.length, true);
    local.setUint32(22, bytes.length, true);
    local.setUint16(26, nameBytes.length, true);
    parts.push(local.buffer, nameBytes, bytes);
    const cd = new DataView(new ArrayBuffer(46));
    cd.setUint32(0, 0x02014b50, true);
    cd.setUint16(4, 20, true); // version made by
    cd.setUint16(6, 20, true); // version needed
    cd.setUint16(14, 33, true);
    cd.setUint32(16, crc, true);
    cd.setUint32(20, bytes.length, true);
    cd.setUint32(24, bytes.length, true);
    cd.setUint16(28, nameBytes.length, true);
    cd.setUint32(42, offset, true);
    central.push(cd.buffer, nameBytes);
    offset += 30 + nameBytes.length + bytes.length;
  }
  const cdSize = central.reduce((n, p) => n + p.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true);
  end.setUint16(8, files.length, true);
  end.setUint16(10, files.length, true);
  end.setUint32(12, cdSize, true);
  end.setUint32(16, offset, true);
  return new Blob([...parts, ...central, end.buffer], { type: "application/x-npz" });
}
