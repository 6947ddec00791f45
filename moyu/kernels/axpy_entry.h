// The axpy entry points of one SIMD code path: n <= kGroup rows -> that path's axpy_g<G, Q4>.
// Included inside the avx2 and avx512 namespaces of quant_kernels.cpp, after their axpy_g,
// so each copy is compiled with its path's target options; it includes nothing.

template <bool Q4>
void axpy_n(const QM& w, int n, const int64_t* rows, const float* a, float* y, Ahead next) {
  switch (n) {
    case 1: axpy_g<1, Q4>(w, rows, a, y, next); break;
    case 2: axpy_g<2, Q4>(w, rows, a, y, next); break;
    case 3: axpy_g<3, Q4>(w, rows, a, y, next); break;
    case 4: axpy_g<4, Q4>(w, rows, a, y, next); break;
    case 5: axpy_g<5, Q4>(w, rows, a, y, next); break;
    case 6: axpy_g<6, Q4>(w, rows, a, y, next); break;
    case 7: axpy_g<7, Q4>(w, rows, a, y, next); break;
    default: axpy_g<8, Q4>(w, rows, a, y, next); break;
  }
}

void axpy_i8(const QM& w, int n, const int64_t* rows, const float* a, float* y, Ahead next) {
  axpy_n<false>(w, n, rows, a, y, next);
}

void axpy_i4(const QM& w, int n, const int64_t* rows, const float* a, float* y, Ahead next) {
  axpy_n<true>(w, n, rows, a, y, next);
}
