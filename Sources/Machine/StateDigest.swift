import COpenSSL
import KVM

/// SHA-256 (OpenSSL) over all guest RAM, the vCPU state and the device state: the `state-digest:` line.
/// Record and replay of one run must print the same value.
public enum StateDigest {
    public static func compute(memory: GuestMemory, vcpu: VCPU, deviceState: [UInt8]) throws(SysError) -> [UInt8] {
        let ctx = EVP_MD_CTX_new()
        defer { EVP_MD_CTX_free(ctx) }
        EVP_DigestInit_ex(ctx, EVP_sha256(), nil)
        EVP_DigestUpdate(ctx, memory.base, Int(memory.size))
        var regs = try vcpu.regs()
        withUnsafeBytes(of: &regs) { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        var sregs = try vcpu.sregs()
        withUnsafeBytes(of: &sregs) { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        var fpu = try vcpu.fpu()
        withUnsafeBytes(of: &fpu) { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        deviceState.withUnsafeBytes { _ = EVP_DigestUpdate(ctx, $0.baseAddress, $0.count) }
        var out = [UInt8](repeating: 0, count: 32)
        var len: UInt32 = 32
        EVP_DigestFinal_ex(ctx, &out, &len)
        return out
    }

    public static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        bytes.withUnsafeBytes { _ = SHA256($0.baseAddress?.assumingMemoryBound(to: UInt8.self), $0.count, &out) }
        return out
    }

    public static func hex(_ b: [UInt8]) -> String { b.map { String(format2($0)) }.joined() }
    static func format2(_ v: UInt8) -> String { let s = String(v, radix: 16); return s.count == 1 ? "0" + s : s }
}
