#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/err.h>
#include <openssl/crypto.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* The etcd fence's TLS client (Failover/EtcdTLS.swift). These are macros over SSL_ctrl / SSL_CTX_ctrl in
   OpenSSL's headers, which Swift cannot call. */
static inline int lk_ssl_set_sni(SSL *ssl, const char *name) { return (int)SSL_set_tlsext_host_name(ssl, name); }
static inline int lk_ssl_ctx_min_tls12(SSL_CTX *ctx) { return (int)SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION); }
/* A server that closes without close_notify after its reply (Connection: close) ends the stream, not an error:
   the HTTP parser still refuses a reply cut short. */
static inline void lk_ssl_ctx_eof_ends_stream(SSL_CTX *ctx) {
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
    SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
#endif
}
