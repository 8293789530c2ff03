/* Request rows -> bucket ids in one C pass (ranking.data.fastrows wraps it; the pure-Python
 * path in serving/request.py gives the same ids and is the fallback where this is not built).
 *
 * scan(rows, context, columns, buckets, seed, max_chars, out) -> tuple | None
 *
 *   rows     list of dicts (the candidates), n of them
 *   context  dict (values shared by every row unless a row sends its own)
 *   columns  tuple of k str: every feature column of the schema
 *   buckets  tuple of k int: num_buckets of a plainly hashed categorical column, 0 for others
 *   seed     the schema's hash seed
 *   max_chars  the longest string accepted (characters)
 *   out      writable buffer of k * (n + 1) int64 (C order [k, n + 1])
 *
 * For column j and row i, out[j, i] is
 *   hashed column (buckets[j] >= 2): the bucket of a string value, 0 (NULL_BUCKET) for None,
 *                                    -1 when the row lacks the key;
 *   other column:                    1 when the row has the key (any value), -1 when not;
 * and out[j, n] is the same for the context's value.
 *
 * The bucket of a string s is exactly ranking/data/hashing.py's: FNV-1a-64 over its UTF-8
 * bytes, plus (seed + 1) * golden gamma, the splitmix64 finaliser, then 1 + z mod (nb - 1).
 *
 * Returns the tuple of hashed column indices holding a value other than a str or None (the
 * caller handles those columns itself: their rows in out only tell present (>= 0) from absent
 * (-1)), or None when the rows
 * need the per-value checks: a row that is not a dict, a row key that is not in columns, or,
 * in a hashed column that is not in that tuple, a string longer than max_chars or one that
 * has no UTF-8 form (a lone surrogate).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FNV_OFFSET 0xCBF29CE484222325ULL
#define FNV_PRIME 0x100000001B3ULL
#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ULL
#define M1 0xBF58476D1CE4E5B9ULL
#define M2 0x94D049BB133111EBULL

static inline uint64_t bucket_of(const char *s, Py_ssize_t len, uint64_t seed_add, uint64_t mod) {
    uint64_t h = FNV_OFFSET;
    for (Py_ssize_t i = 0; i < len; i++) {
        h ^= (uint8_t)s[i];
        h *= FNV_PRIME;
    }
    uint64_t z = h + seed_add;
    z = (z ^ (z >> 30)) * M1;
    z = (z ^ (z >> 27)) * M2;
    z ^= z >> 31;
    return 1 + z % mod;
}

/* 0: ok (bucket or -1/0 written), 1: not a str/None (column falls back), -1: needs per-value
 * checks (too long, no UTF-8 form; the Python error indicator is cleared). */
static int one_value(PyObject *v, int hashed, uint64_t seed_add, uint64_t mod, Py_ssize_t max_chars,
                     int64_t *dst) {
    if (v == NULL) {
        *dst = -1;
        return 0;
    }
    if (!hashed) {
        *dst = 1;
        return 0;
    }
    if (v == Py_None) {
        *dst = 0;
        return 0;
    }
    if (!PyUnicode_CheckExact(v)) {
        *dst = 1; /* present; the column is the caller's from now on */
        return 1;
    }
    if (PyUnicode_GET_LENGTH(v) > max_chars)
        return -1;
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(v, &len);
    if (s == NULL) {
        PyErr_Clear();
        return -1;
    }
    *dst = (int64_t)bucket_of(s, len, seed_add, mod);
    return 0;
}

/* A column's state: OK, MIXED (a value other than str/None: the caller reads the column) or
 * BAD (a string needing the per-value checks, in a column that is not MIXED). */
enum { OK = 0, MIXED = 1, BAD = 2 };

static inline void note(char *state, int r) {
    if (r == 1)
        *state = MIXED;
    else if (r < 0)
        *state = BAD;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *rows, *context, *columns, *buckets;
    unsigned long long seed;
    Py_ssize_t max_chars;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "O!O!O!O!Knw*", &PyList_Type, &rows, &PyDict_Type, &context,
                          &PyTuple_Type, &columns, &PyTuple_Type, &buckets, &seed, &max_chars,
                          &out))
        return NULL;
    PyObject *result = NULL;
    char *state = NULL;
    uint64_t *mods = NULL;
    Py_ssize_t n = PyList_GET_SIZE(rows), k = PyTuple_GET_SIZE(columns);
    if (PyTuple_GET_SIZE(buckets) != k) {
        PyErr_SetString(PyExc_ValueError, "columns and buckets differ in length");
        goto done;
    }
    if (out.len != (Py_ssize_t)sizeof(int64_t) * k * (n + 1) || out.itemsize != sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "out must hold %zd int64, got %zd bytes", k * (n + 1),
                     out.len);
        goto done;
    }
    int64_t *dst = (int64_t *)out.buf;
    uint64_t seed_add = (seed + 1ULL) * GOLDEN_GAMMA;
    state = PyMem_Calloc(k ? k : 1, 1);
    mods = PyMem_Calloc(k ? k : 1, sizeof(uint64_t));
    if (state == NULL || mods == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(columns, j))) {
            PyErr_SetString(PyExc_TypeError, "columns must be str");
            goto done;
        }
        long long nb = PyLong_AsLongLong(PyTuple_GET_ITEM(buckets, j));
        if (nb == -1 && PyErr_Occurred())
            goto done;
        mods[j] = nb >= 2 ? (uint64_t)(nb - 1) : 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (!PyDict_CheckExact(row)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        Py_ssize_t found = 0;
        for (Py_ssize_t j = 0; j < k; j++) {
            PyObject *v = PyDict_GetItemWithError(row, PyTuple_GET_ITEM(columns, j));
            if (v == NULL && PyErr_Occurred())
                goto done;
            found += v != NULL;
            note(&state[j], one_value(v, mods[j] != 0 && state[j] != MIXED, seed_add, mods[j],
                                      max_chars, dst + j * (n + 1) + i));
        }
        if (found != PyDict_GET_SIZE(row)) { /* a key that is no feature column */
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *v = PyDict_GetItemWithError(context, PyTuple_GET_ITEM(columns, j));
        if (v == NULL && PyErr_Occurred())
            goto done;
        note(&state[j], one_value(v, mods[j] != 0 && state[j] != MIXED, seed_add, mods[j],
                                  max_chars, dst + j * (n + 1) + n));
    }
    Py_ssize_t m = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        if (state[j] == BAD) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        m += state[j] == MIXED;
    }
    result = PyTuple_New(m);
    if (result == NULL)
        goto done;
    m = 0;
    for (Py_ssize_t j = 0; j < k; j++) {
        if (state[j] == MIXED) {
            PyObject *idx = PyLong_FromSsize_t(j);
            if (idx == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            PyTuple_SET_ITEM(result, m++, idx);
        }
    }
done:
    PyMem_Free(state);
    PyMem_Free(mods);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(rows, context, columns, buckets, seed, max_chars, out) -> tuple | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastrows",
                                    "Request rows -> bucket ids (see _fastrows.c)", -1, methods};

PyMODINIT_FUNC PyInit__fastrows(void) { return PyModule_Create(&module); }
