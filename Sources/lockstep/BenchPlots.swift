import Foundation

/// Hand-written SVG plots for `lockstep bench pair` (no plotting dependency: a frame, axes, a polyline or bars).
struct SVGPlot {
    struct Axis {
        var lo: Double
        var hi: Double
        var log: Bool
        var label: String

        func frac(_ v: Double) -> Double {
            let f = log ? (log10(max(v, lo)) - log10(lo)) / (log10(hi) - log10(lo)) : (v - lo) / (hi - lo)
            return min(max(f.isFinite ? f : 0, 0), 1)
        }

        /// Decades on a log axis; 1-2-5 steps on a linear one.
        var ticks: [Double] {
            if log {
                var t: [Double] = []
                var v = pow(10, floor(log10(lo)))
                while v <= hi * 1.0001 { if v >= lo * 0.9999 { t.append(v) }; v *= 10 }
                return t
            }
            let raw = (hi - lo) / 5
            guard raw > 0 else { return [lo] }
            let mag = pow(10, floor(log10(raw)))
            let step = [1.0, 2, 5, 10].map { $0 * mag }.first { $0 >= raw } ?? 10 * mag
            return stride(from: ceil(lo / step) * step, through: hi + step * 1e-9, by: step).map { $0 }
        }

        /// A log axis covering `lo...hi` in whole decades.
        static func decades(_ lo: Double, _ hi: Double, label: String) -> Axis {
            let l = pow(10, floor(log10(max(lo, 0.1))))
            return Axis(lo: l, hi: max(pow(10, ceil(log10(max(hi, l * 10)))), l * 10), log: true, label: label)
        }
    }

    let width = 760.0, height = 340.0
    let left = 72.0, right = 24.0, top = 44.0, bottom = 52.0
    var title: String
    var x: Axis
    var y: Axis
    private var body: [String] = []
    /// Vertical markers drawn so far: their labels are stacked so they do not overlap.
    private var verticals = 0

    init(title: String, x: Axis, y: Axis) { self.title = title; self.x = x; self.y = y }

    func px(_ v: Double) -> Double { left + (width - left - right) * x.frac(v) }
    func py(_ v: Double) -> Double { height - bottom - (height - top - bottom) * y.frac(v) }

    static func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
    static func n(_ v: Double) -> String { String(format: "%.1f", v) }
    static func tickText(_ v: Double) -> String {
        if v >= 1_000_000 { return String(format: "%gM", v / 1_000_000) }
        if v >= 1000 { return String(format: "%gk", v / 1000) }
        return String(format: "%g", v)
    }

    mutating func polyline(_ points: [(Double, Double)], color: String = "#1f6fb2") {
        guard !points.isEmpty else { return }
        let p = points.map { "\(Self.n(px($0.0))),\(Self.n(py($0.1)))" }.joined(separator: " ")
        body.append("<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"1\" points=\"\(p)\"/>")
    }

    mutating func bar(from x0: Double, to x1: Double, height v: Double, color: String = "#1f6fb2") {
        let a = px(x0), b = px(x1), t = py(v), base = py(y.lo)
        body.append("<rect x=\"\(Self.n(a))\" y=\"\(Self.n(t))\" width=\"\(Self.n(max(b - a - 0.5, 0.5)))\" height=\"\(Self.n(max(base - t, 0)))\" fill=\"\(color)\"/>")
    }

    /// A horizontal (at a y value) or vertical (at an x value) marker line with a label.
    mutating func marker(horizontal: Bool, at v: Double, label: String, color: String, dashed: Bool) {
        let dash = dashed ? " stroke-dasharray=\"5,4\"" : ""
        if horizontal {
            guard v >= y.lo, v <= y.hi else { return }
            let yy = Self.n(py(v))
            body.append("<line x1=\"\(Self.n(left))\" y1=\"\(yy)\" x2=\"\(Self.n(width - right))\" y2=\"\(yy)\" stroke=\"\(color)\"\(dash)/>")
            body.append("<text x=\"\(Self.n(width - right - 4))\" y=\"\(Self.n(py(v) - 4))\" text-anchor=\"end\" fill=\"\(color)\">\(Self.esc(label))</text>")
        } else {
            guard v >= x.lo, v <= x.hi else { return }
            let xx = Self.n(px(v))
            body.append("<line x1=\"\(xx)\" y1=\"\(Self.n(top))\" x2=\"\(xx)\" y2=\"\(Self.n(height - bottom))\" stroke=\"\(color)\"\(dash)/>")
            body.append("<text x=\"\(Self.n(px(v) + 3))\" y=\"\(Self.n(top + 12 + Double(verticals) * 13))\" fill=\"\(color)\">\(Self.esc(label))</text>")
            verticals += 1
        }
    }

    var svg: String {
        var out = ["<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" font-family=\"sans-serif\" font-size=\"11\">",
                   "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>",
                   "<text x=\"\(Self.n(width / 2))\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">\(Self.esc(title))</text>"]
        for t in x.ticks {
            let xx = Self.n(px(t))
            out.append("<line x1=\"\(xx)\" y1=\"\(Self.n(top))\" x2=\"\(xx)\" y2=\"\(Self.n(height - bottom))\" stroke=\"#e4e4e4\"/>")
            out.append("<text x=\"\(xx)\" y=\"\(Self.n(height - bottom + 16))\" text-anchor=\"middle\">\(Self.tickText(t))</text>")
        }
        for t in y.ticks {
            let yy = Self.n(py(t))
            out.append("<line x1=\"\(Self.n(left))\" y1=\"\(yy)\" x2=\"\(Self.n(width - right))\" y2=\"\(yy)\" stroke=\"#e4e4e4\"/>")
            out.append("<text x=\"\(Self.n(left - 6))\" y=\"\(Self.n(py(t) + 4))\" text-anchor=\"end\">\(Self.tickText(t))</text>")
        }
        out.append("<rect x=\"\(Self.n(left))\" y=\"\(Self.n(top))\" width=\"\(Self.n(width - left - right))\" height=\"\(Self.n(height - top - bottom))\" fill=\"none\" stroke=\"#444\"/>")
        out.append("<text x=\"\(Self.n((left + width - right) / 2))\" y=\"\(Self.n(height - 12))\" text-anchor=\"middle\">\(Self.esc(x.label))</text>")
        out.append("<text x=\"16\" y=\"\(Self.n((top + height - bottom) / 2))\" text-anchor=\"middle\" transform=\"rotate(-90 16 \(Self.n((top + height - bottom) / 2)))\">\(Self.esc(y.label))</text>")
        return (out + body + ["</svg>", ""]).joined(separator: "\n")
    }
}

enum PairPlots {
    static let targetColor = "#c0392b"

    /// Replication lag of each sampled batch over the run (log µs axis), with the p50/p99 targets.
    static func lagOverTime(guest: String, series: [[Double]], p50Target: Double, p99Target: Double) -> String {
        let pts = series.compactMap { $0.count == 2 ? ($0[0], $0[1]) : nil }
        let tMax = max(pts.map(\.0).max() ?? 1, 0.001)
        let lags = pts.map(\.1)
        var p = SVGPlot(title: "\(guest): replication lag over time (batch sent → secondary holds it), \(pts.count) samples",
                        x: .init(lo: 0, hi: tMax, log: false, label: "seconds since the primary started"),
                        y: .decades(min(lags.min() ?? 1, p50Target), max(lags.max() ?? 1000, p99Target), label: "replication lag (µs)"))
        p.polyline(pts)
        p.marker(horizontal: true, at: p50Target, label: "p50 target \(Int(p50Target)) µs", color: targetColor, dashed: true)
        p.marker(horizontal: true, at: p99Target, label: "p99 target \(Int(p99Target)) µs", color: targetColor, dashed: true)
        return p.svg
    }

    /// Replication lag histogram, re-binned to 10 log bins per decade, with the measured p50/p99 and the targets.
    static func lagHistogram(guest: String, buckets: [[Double]], p50: Double, p99: Double, p50Target: Double, p99Target: Double) -> String {
        var bins: [Int: Double] = [:]
        for b in buckets where b.count == 2 && b[1] > 0 {
            bins[Int(floor(log10(max(b[0], 0.1)) * 10)), default: 0] += b[1]
        }
        let total = bins.values.reduce(0, +)
        let lo = bins.keys.min().map { pow(10, Double($0) / 10) } ?? 1
        let hi = bins.keys.max().map { pow(10, Double($0 + 1) / 10) } ?? 1000
        var p = SVGPlot(title: "\(guest): replication lag histogram (\(Int(total)) batches)",
                        x: .decades(min(lo, p50Target), max(hi, p99Target), label: "replication lag (µs, log scale; 10 bins per decade)"),
                        y: .init(lo: 0, hi: max(bins.values.max() ?? 1, 1) * 1.1, log: false, label: "batches"))
        for (k, c) in bins.sorted(by: { $0.key < $1.key }) {
            p.bar(from: pow(10, Double(k) / 10), to: pow(10, Double(k + 1) / 10), height: c)
        }
        p.marker(horizontal: false, at: p50, label: "p50 \(Bench.fmt(p50)) µs", color: "#27ae60", dashed: false)
        p.marker(horizontal: false, at: p99, label: "p99 \(Bench.fmt(p99)) µs", color: "#8e44ad", dashed: false)
        p.marker(horizontal: false, at: p50Target, label: "target p50", color: targetColor, dashed: true)
        p.marker(horizontal: false, at: p99Target, label: "target p99", color: targetColor, dashed: true)
        return p.svg
    }

    /// kill -9 → first survivor reply per failover trial, as bars, with the p99 target.
    static func failover(_ ms: [Double?], target: Double) -> String {
        let hi = max(ms.compactMap { $0 }.max() ?? 1, target) * 1.15
        var p = SVGPlot(title: "kill -9 of the primary → first reply from the survivor, per trial (red: no reply)",
                        x: .init(lo: 0.5, hi: Double(max(ms.count, 1)) + 0.5, log: false, label: "trial"),
                        y: .init(lo: 0, hi: hi, log: false, label: "ms"))
        for (i, v) in ms.enumerated() {
            p.bar(from: Double(i) + 0.6, to: Double(i) + 1.4, height: v ?? hi, color: v == nil ? targetColor : "#1f6fb2")
        }
        p.marker(horizontal: true, at: target, label: "p99 target \(Int(target)) ms", color: targetColor, dashed: true)
        return p.svg
    }
}
