/* A serialized mixrank.v1.RankRequest -> the JSON request shape, straight from the wire format
 * (serving/request.py: proto_dict; serving/proto/ranking.proto).
 *
 * decode(data: bytes) -> dict | None
 *
 * Gives exactly what serving.request.proto_to_dict gives for the message protobuf parses from
 * the same bytes: {"request_id": str | None, "context": {name: value}, "candidates": [{name:
 * value}, ...], "top_k": int | None}, where a value is None (no kind set), a str, an int, a float,
 * or a list of values. Reading the message through protobuf's Python API costs about 2 ms for
 * 256 candidates x 10 features (one Python object per map entry and value); this is one C pass.
 *
 * Returns None, so that the caller goes through protobuf instead, for anything a plain encoder
 * does not write or that protobuf might read differently: malformed or truncated data, invalid
 * UTF-8, a known field with an unexpected wire type, group wire types, a map entry or a
 * FeatureValue holding a field twice (protobuf merges those), a kind field after another kind,
 * a map entry with an unknown field (protobuf keeps the entry out of the map), or values nested
 * deeper than MAX_DEPTH lists. Other unknown fields are skipped, as protobuf does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 8
#define MAX_KEYS 64

typedef struct {
    const uint8_t *p, *end;
} Reader;

/* Key strings repeat in every candidate: one str object per distinct key in a request. */
typedef struct {
    const char *s[MAX_KEYS];
    Py_ssize_t len[MAX_KEYS];
    PyObject *obj[MAX_KEYS];
    int n;
} Keys;

static int read_varint(Reader *r, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end)
            return -1;
        uint8_t b = *r->p++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1; /* more than 10 bytes */
}

static int read_len(Reader *r, Reader *sub) {
    uint64_t n;
    if (read_varint(r, &n) < 0 || n > (uint64_t)(r->end - r->p))
        return -1;
    sub->p = r->p;
    sub->end = r->p + n;
    r->p += n;
    return 0;
}

static int skip_field(Reader *r, int wire) {
    uint64_t v;
    Reader sub;
    switch (wire) {
    case 0:
        return read_varint(r, &v);
    case 1:
        if (r->end - r->p < 8)
            return -1;
        r->p += 8;
        return 0;
    case 2:
        return read_len(r, &sub);
    case 5:
        if (r->end - r->p < 4)
            return -1;
        r->p += 4;
        return 0;
    default: /* groups (3, 4) and invalid wire types */
        return -1;
    }
}

static int read_tag(Reader *r, uint32_t *field, int *wire) {
    uint64_t tag;
    if (read_varint(r, &tag) < 0 || tag > 0xFFFFFFFFULL || (tag >> 3) == 0)
        return -1;
    *field = (uint32_t)(tag >> 3);
    *wire = (int)(tag & 7);
    return 0;
}

/* A new reference to the str of s[0:len] (strict UTF-8), or NULL with no exception set. */
static PyObject *utf8(const uint8_t *s, Py_ssize_t len) {
    PyObject *o = PyUnicode_DecodeUTF8((const char *)s, len, "strict");
    if (o == NULL)
        PyErr_Clear();
    return o;
}

static PyObject *key_str(Keys *keys, const uint8_t *s, Py_ssize_t len) {
    for (int i = 0; i < keys->n; i++)
        if (keys->len[i] == len && memcmp(keys->s[i], s, len) == 0)
            return Py_NewRef(keys->obj[i]);
    PyObject *o = utf8(s, len);
    if (o != NULL && keys->n < MAX_KEYS) {
        keys->s[keys->n] = (const char *)s;
        keys->len[keys->n] = len;
        keys->obj[keys->n++] = Py_NewRef(o);
    }
    return o;
}

static PyObject *feature_value(Reader r, int depth);

/* IdList: repeated FeatureValue values = 1 -> a new list, or NULL (no exception set) */
static PyObject *id_list(Reader r, int depth) {
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyErr_Clear();
        return NULL;
    }
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        if (read_tag(&r, &field, &wire) < 0)
            goto fail;
        if (field != 1) {
            if (skip_field(&r, wire) < 0)
                goto fail;
            continue;
        }
        Reader sub;
        if (wire != 2 || read_len(&r, &sub) < 0)
            goto fail;
        PyObject *v = feature_value(sub, depth + 1);
        if (v == NULL)
            goto fail;
        int rc = PyList_Append(out, v);
        Py_DECREF(v);
        if (rc < 0) {
            PyErr_Clear();
            goto fail;
        }
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* FeatureValue (oneof kind) -> None | str | int | float | list; NULL (no exception) to give up */
static PyObject *feature_value(Reader r, int depth) {
    if (depth > MAX_DEPTH)
        return NULL;
    PyObject *out = NULL;
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        if (read_tag(&r, &field, &wire) < 0)
            goto fail;
        if (field < 1 || field > 4) {
            if (skip_field(&r, wire) < 0)
                goto fail;
            continue;
        }
        if (out != NULL) /* a second kind field: protobuf's merge rules decide */
            goto fail;
        if (field == 1 || field == 4) {
            Reader sub;
            if (wire != 2 || read_len(&r, &sub) < 0)
                goto fail;
            out = field == 1 ? utf8(sub.p, sub.end - sub.p) : id_list(sub, depth);
        } else if (field == 2) {
            uint64_t v;
            if (wire != 0 || read_varint(&r, &v) < 0)
                goto fail;
            out = PyLong_FromLongLong((long long)(int64_t)v);
        } else {
            if (wire != 1 || r.end - r.p < 8)
                goto fail;
            double d;
            uint64_t bits = 0;
            for (int i = 7; i >= 0; i--)
                bits = (bits << 8) | r.p[i]; /* little-endian on the wire */
            memcpy(&d, &bits, 8);
            r.p += 8;
            out = PyFloat_FromDouble(d);
        }
        if (out == NULL) {
            PyErr_Clear();
            return NULL;
        }
    }
    return out != NULL ? out : Py_NewRef(Py_None);
fail:
    Py_XDECREF(out);
    return NULL;
}

/* One map<string, FeatureValue> entry, set into dict; -1 to give up */
static int map_entry(Reader r, PyObject *dict, Keys *keys) {
    const uint8_t *ks = (const uint8_t *)"";
    Py_ssize_t klen = 0;
    Reader value = {NULL, NULL};
    int seen_key = 0, seen_value = 0;
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        if (read_tag(&r, &field, &wire) < 0)
            return -1;
        if (field != 1 && field != 2) /* protobuf keeps such an entry out of the map */
            return -1;
        Reader sub;
        if (wire != 2 || read_len(&r, &sub) < 0)
            return -1;
        if (field == 1) {
            ks = sub.p;
            klen = sub.end - sub.p;
            seen_key++;
        } else {
            value = sub;
            seen_value++;
        }
    }
    if (seen_key > 1 || seen_value > 1) /* protobuf: last key wins, value messages merge */
        return -1;
    PyObject *k = key_str(keys, ks, klen);
    if (k == NULL)
        return -1;
    PyObject *v = seen_value ? feature_value(value, 0) : Py_NewRef(Py_None);
    if (v == NULL) {
        Py_DECREF(k);
        return -1;
    }
    int rc = PyDict_SetItem(dict, k, v); /* a later entry for the same key wins, as in protobuf */
    Py_DECREF(k);
    Py_DECREF(v);
    if (rc < 0) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

static PyObject *decode(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    Reader r = {(const uint8_t *)buf.buf, (const uint8_t *)buf.buf + buf.len};
    Keys keys = {.n = 0};
    PyObject *request_id = NULL, *context = PyDict_New(), *candidates = PyList_New(0);
    PyObject *result = NULL;
    int32_t top_k = 0;
    if (context == NULL || candidates == NULL)
        goto done; /* exception set */
    while (r.p < r.end) {
        uint32_t field;
        int wire;
        if (read_tag(&r, &field, &wire) < 0)
            goto give_up;
        if (field < 1 || field > 4) {
            if (skip_field(&r, wire) < 0)
                goto give_up;
            continue;
        }
        if (field == 4) {
            uint64_t v;
            if (wire != 0 || read_varint(&r, &v) < 0)
                goto give_up;
            top_k = (int32_t)(uint32_t)v; /* int32: the low 32 bits of the varint */
            continue;
        }
        Reader sub;
        if (wire != 2 || read_len(&r, &sub) < 0)
            goto give_up;
        if (field == 1) {
            Py_XDECREF(request_id);
            request_id = utf8(sub.p, sub.end - sub.p); /* the last one wins */
            if (request_id == NULL)
                goto give_up;
        } else if (field == 2) {
            if (map_entry(sub, context, &keys) < 0)
                goto give_up;
        } else { /* Candidate: map<string, FeatureValue> features = 1 */
            PyObject *cand = PyDict_New();
            if (cand == NULL)
                goto done;
            int rc = PyList_Append(candidates, cand);
            Py_DECREF(cand);
            if (rc < 0)
                goto done;
            while (sub.p < sub.end) {
                uint32_t f;
                int w;
                Reader entry;
                if (read_tag(&sub, &f, &w) < 0)
                    goto give_up;
                if (f != 1) {
                    if (skip_field(&sub, w) < 0)
                        goto give_up;
                    continue;
                }
                if (w != 2 || read_len(&sub, &entry) < 0 || map_entry(entry, cand, &keys) < 0)
                    goto give_up;
            }
        }
    }
    {
        /* proto_to_dict: an empty request_id and a zero top_k read as unset */
        PyObject *rid = (request_id != NULL && PyUnicode_GET_LENGTH(request_id) > 0)
                            ? Py_NewRef(request_id)
                            : Py_NewRef(Py_None);
        PyObject *tk = top_k != 0 ? PyLong_FromLong(top_k) : Py_NewRef(Py_None);
        if (tk == NULL) {
            Py_DECREF(rid);
            goto done;
        }
        result = Py_BuildValue("{sNsOsOsN}", "request_id", rid, "context", context, "candidates",
                               candidates, "top_k", tk);
    }
    goto done;
give_up:
    PyErr_Clear();
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < keys.n; i++)
        Py_DECREF(keys.obj[i]);
    Py_XDECREF(request_id);
    Py_XDECREF(context);
    Py_XDECREF(candidates);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_O, "decode(data: bytes) -> dict | None (see _fastproto.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastproto",
                                    "RankRequest wire format -> the JSON request shape", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fastproto(void) { return PyModule_Create(&module); }
