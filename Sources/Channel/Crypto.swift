import COpenSSL

/// Encryption policy of one side (vSphere encrypted vMotion semantics).
public enum EncryptionMode: UInt8, Sendable, Equatable, CaseIterable {
    /// Never encrypts; a peer that requires encryption is refused.
    case disabled = 1
    /// Encrypts when the peer can (is not `disabled`).
    case opportunistic = 2
    /// Encrypts, and refuses a peer that cannot.
    case required = 3

    /// The negotiated outcome for two sides: true = encrypted, false = clear, or a refusal text.
    public static func negotiate(local: EncryptionMode, remote: EncryptionMode) -> Result<Bool, ChannelError> {
        if local == .required && remote == .disabled {
            return .failure(.encryptionRefused("this side requires encryption but the peer has it disabled"))
        }
        if remote == .required && local == .disabled {
            return .failure(.encryptionRefused("the peer requires encryption but this side has it disabled"))
        }
        return .success(local != .disabled && remote != .disabled)
    }
}

enum Crypto {
    static func opensslError(_ what: String) -> ChannelError {
        let code = ERR_get_error()
        var buf = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &buf, buf.count)
        return .crypto("\(what): \(String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))")
    }

    static func random(_ n: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        guard RAND_bytes(&out, Int32(n)) == 1 else { throw opensslError("RAND_bytes") }
        return out
    }

    static func hmacSHA256(key: [UInt8], _ parts: [[UInt8]]) -> [UInt8] {
        var data: [UInt8] = []
        for p in parts { data.append(contentsOf: p) }
        var out = [UInt8](repeating: 0, count: 32)
        var len: UInt32 = 32
        _ = key.withUnsafeBufferPointer { k in
            data.withUnsafeBufferPointer { d in
                HMAC(EVP_sha256(), k.baseAddress, Int32(k.count), d.baseAddress, d.count, &out, &len)
            }
        }
        return out
    }

    /// HKDF-SHA256 (RFC 5869), extract + expand to `length` bytes.
    static func hkdf(ikm: [UInt8], salt: [UInt8], info: [UInt8], length: Int) -> [UInt8] {
        let prk = hmacSHA256(key: salt, [ikm])
        var okm: [UInt8] = []
        var t: [UInt8] = []
        var counter: UInt8 = 1
        while okm.count < length {
            t = hmacSHA256(key: prk, [t, info, [counter]])
            okm.append(contentsOf: t)
            counter += 1
        }
        return Array(okm.prefix(length))
    }

    /// Constant-time comparison.
    static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        return a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in CRYPTO_memcmp(pa.baseAddress, pb.baseAddress, a.count) == 0 } }
    }
}

/// One direction of AES-256-GCM. The key is set once; each frame only sets a new IV on the same
/// EVP context. IV = 4 zero bytes || u64 big-endian frame counter (keys differ per direction, so
/// the counter alone makes IVs unique; the receiver's counter also rejects replay and reordering).
final class GCMDirection {
    private let ctx: OpaquePointer
    private let encrypt: Bool
    private(set) var counter: UInt64 = 0

    init(key: [UInt8], encrypt: Bool) throws {
        precondition(key.count == 32)
        guard let c = EVP_CIPHER_CTX_new() else { throw Crypto.opensslError("EVP_CIPHER_CTX_new") }
        ctx = c
        self.encrypt = encrypt
        let ok = key.withUnsafeBufferPointer { k in
            encrypt ? EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), nil, k.baseAddress, nil)
                    : EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), nil, k.baseAddress, nil)
        }
        guard ok == 1 else { EVP_CIPHER_CTX_free(c); throw Crypto.opensslError("EVP init") }
    }
    deinit { EVP_CIPHER_CTX_free(ctx) }

    private func setIV() -> Bool {
        // On the stack (this runs for every frame): 4 zero bytes, then the counter big-endian as two halves.
        var iv: (UInt32, UInt32, UInt32) = (0, UInt32(truncatingIfNeeded: counter >> 32).bigEndian,
                                           UInt32(truncatingIfNeeded: counter).bigEndian)
        counter &+= 1
        return withUnsafeBytes(of: &iv) { p in
            // SAFETY: three UInt32s lie at offsets 0, 4 and 8 (12 bytes, no padding); EVP reads exactly 12.
            encrypt ? EVP_EncryptInit_ex(ctx, nil, nil, nil, p.baseAddress!.assumingMemoryBound(to: UInt8.self)) == 1
                    : EVP_DecryptInit_ex(ctx, nil, nil, nil, p.baseAddress!.assumingMemoryBound(to: UInt8.self)) == 1
        }
    }

    /// Encrypts `count` bytes from `src` to `dst` (may be equal) and writes the 16-byte tag at `dst + count`.
    func seal(aad: UnsafeRawPointer, aadCount: Int, src: UnsafeRawPointer, count: Int, dst: UnsafeMutableRawPointer) throws {
        guard setIV() else { throw Crypto.opensslError("GCM set IV") }
        var outl: Int32 = 0
        guard EVP_EncryptUpdate(ctx, nil, &outl, aad.assumingMemoryBound(to: UInt8.self), Int32(aadCount)) == 1 else { throw Crypto.opensslError("GCM AAD") }
        var done = 0
        while done < count {   // EVP takes an Int32 length
            let n = min(count - done, 1 << 30)
            guard EVP_EncryptUpdate(ctx, (dst + done).assumingMemoryBound(to: UInt8.self), &outl,
                                    (src + done).assumingMemoryBound(to: UInt8.self), Int32(n)) == 1 else { throw Crypto.opensslError("GCM encrypt") }
            done += n
        }
        guard EVP_EncryptFinal_ex(ctx, (dst + count).assumingMemoryBound(to: UInt8.self), &outl) == 1,
              EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, Int32(FrameLayout.tagBytes), dst + count) == 1
        else { throw Crypto.opensslError("GCM tag") }
    }

    /// Decrypts in place `count` ciphertext bytes followed by the tag. False = authentication failed.
    func open(aad: UnsafeRawPointer, aadCount: Int, buf: UnsafeMutableRawPointer, count: Int) -> Bool {
        guard setIV() else { return false }
        var outl: Int32 = 0
        guard EVP_DecryptUpdate(ctx, nil, &outl, aad.assumingMemoryBound(to: UInt8.self), Int32(aadCount)) == 1 else { return false }
        var done = 0
        while done < count {
            let n = min(count - done, 1 << 30)
            let p = (buf + done).assumingMemoryBound(to: UInt8.self)
            guard EVP_DecryptUpdate(ctx, p, &outl, p, Int32(n)) == 1 else { return false }
            done += n
        }
        guard EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, Int32(FrameLayout.tagBytes), buf + count) == 1 else { return false }
        return EVP_DecryptFinal_ex(ctx, (buf + count).assumingMemoryBound(to: UInt8.self), &outl) == 1
    }
}
