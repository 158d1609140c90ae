/* esmflash: written by tools/publish.py after `asv publish` (loaded by index.html after asv's
   libraries, before asv.js runs its page). */
(function () {
    'use strict';
    /* Per benchmark, the selection a graph page opens with when its address has none: machines
       and parameter values with data at the newest commit (asv's own default is every machine and
       the first parameter values). */
    var DEFAULTS = {
 "bench_attention.AttentionBackends.time_attention_kernel": "machine=h200&p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-backend=%27fa4%27&p-backend=%27torch_flash%27&p-backend=%27sdpa%27",
 "bench_embed.EmbedFasta.track_fraction_of_forward": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27",
 "bench_embed.EmbedFasta.track_hf_wall_tokens_per_second": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27",
 "bench_embed.EmbedFasta.track_peak_host_rss": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27",
 "bench_embed.EmbedFasta.track_seconds_to_first_batch": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27",
 "bench_embed.EmbedFasta.track_speedup_over_hf_wall": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27",
 "bench_embed.EmbedFasta.track_tokens_per_second": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27",
 "bench_embed.EmbedFasta.track_wall_seconds": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27",
 "bench_forward.ForwardHostMemory.peakmem_forward_packed": "machine=h200&p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp16%27&p-length=%27mixed%27",
 "bench_forward.ForwardPacked.time_forward_packed": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27mixed%27",
 "bench_forward.ForwardPackedHopper.time_forward_packed": "p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27long%27&p-length=%27xlong%27&p-length=%27mixed%27",
 "bench_metrics.ForwardMetrics.track_activation_bytes_per_token": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.ForwardMetrics.track_gpu_peak_memory": "machine=h200&p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp32%27&p-precision=%27fp16%27&p-length=%27short%27&p-length=%27medium%27&p-length=%27long%27&p-length=%27xlong%27",
 "bench_metrics.ForwardMetrics.track_max_rel_error_vs_fp32": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.ForwardMetrics.track_mfu": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.ForwardMetrics.track_mfu_datasheet": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.ForwardMetrics.track_speedup_over_fp32": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.ForwardMetrics.track_speedup_over_hf_fp16": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.ForwardMetrics.track_speedup_over_stock_fp32": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.ForwardMetrics.track_tokens_per_second": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp32%27&p-precision=%27fp16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.HFBaseline.track_hf_max_rel_error_vs_fp32": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-length=%27short%27&p-length=%27xlong%27&p-length=%27mixed%27",
 "bench_metrics.HFBaseline.track_hf_tokens_per_second": "machine=h100-sxm&p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp32%27&p-precision=%27fp16%27&p-length=%27short%27&p-length=%27xlong%27",
 "bench_metrics.HopperMetrics.track_activation_bytes_per_token": "machine=h200&p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27medium%27&p-length=%27long%27&p-length=%27xlong%27",
 "bench_metrics.HopperMetrics.track_max_rel_error_vs_fp32": "machine=h200&p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27medium%27&p-length=%27long%27&p-length=%27xlong%27",
 "bench_metrics.HopperMetrics.track_mfu": "p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27medium%27&p-length=%27long%27&p-length=%27xlong%27",
 "bench_metrics.HopperMetrics.track_speedup_over_bundled": "machine=h200&p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27medium%27&p-length=%27long%27&p-length=%27xlong%27",
 "bench_metrics.HopperMetrics.track_speedup_over_stock_fp32": "machine=h200&p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27medium%27&p-length=%27long%27&p-length=%27xlong%27",
 "bench_metrics.HopperMetrics.track_tokens_per_second": "machine=h200&p-model=%27esm2_t33_650M_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27&p-length=%27short%27&p-length=%27medium%27&p-length=%27long%27&p-length=%27xlong%27",
 "bench_metrics.LargeBatchMemory.track_activation_bytes_per_token": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp16%27&p-precision=%27bf16%27",
 "bench_metrics.RunConditions.track_power_limit_w": "machine=h100-sxm&p-moment=%27before%27&p-moment=%27after%27",
 "bench_metrics.RunConditions.track_sm_clock_mhz": "machine=h100-sxm&p-moment=%27before%27&p-moment=%27after%27",
 "bench_metrics.RunConditions.track_temperature_c": "machine=h100-sxm&p-moment=%27before%27&p-moment=%27after%27",
 "bench_metrics.RunConditions.track_throttled": "machine=h100-sxm&p-moment=%27before%27&p-moment=%27after%27",
 "bench_metrics.StockBaseline.track_stock_tokens_per_second": "p-model=%27esm2_t33_650M_UR50D%27&p-model=%27esm2_t36_3B_UR50D%27&p-precision=%27fp32%27&p-precision=%27fp16%27&p-length=%27short%27&p-length=%27xlong%27"
};

    function with_defaults(hash) {
        var body = hash.replace(/^#\/?/, '');
        var q = body.indexOf('?');
        var location = q < 0 ? body : body.slice(0, q);
        var query = q < 0 ? '' : body.slice(q + 1);
        var name = decodeURIComponent(location);
        if (!Object.prototype.hasOwnProperty.call(DEFAULTS, name) || /(^|&)(p-[^=&]*|machine)=/.test(query)) {
            return null;
        }
        return '#' + location + '?' + (query ? query + '&' : '') + DEFAULTS[name];
    }

    /* Runs before asv's own hashchange handler (registered later, once index.json is loaded) and
       before its first page display: asv reads the completed address. */
    function apply_defaults() {
        var hash = with_defaults(window.location.hash);
        if (hash !== null) {
            window.history.replaceState(null, '', hash);
        }
    }
    apply_defaults();
    window.addEventListener('hashchange', apply_defaults);

    /* Axis labels as HTML text (esmflash.css centres and rotates the y label) instead of canvas
       text: the canvas label of asv's axislabels plugin starts at the middle of the y axis and
       runs off the top of the plot when it is long. */
    function html_axis_labels(plot, options) {
        jQuery.each(options.xaxes.concat(options.yaxes), function (i, axis) {
            axis.axisLabelUseCanvas = false;
        });
    }

    /* asv's "x-axis = <parameter>" view of string parameters (a category x axis, one bar per
       value and series). The categories plugin numbers the values in the order it meets them
       with data, so classes appear out of order: they are given in the parameter's order (asv's
       data lists every value of the axis in order). The orderBars plugin computes its shift from
       the first and last x values of the data, which are category names there, so every bar's x
       becomes NaN and nothing is drawn: its shift is switched off for those series and applied
       here after the names are numbered 0, 1, 2, ...: bar k of n moves by (k - (n - 1) / 2) widths. */
    function prepare_category_series(plot, series, data) {
        if (series.xaxis.options.mode !== 'categories') {
            return;
        }
        if (!series.xaxis.options.categories) {
            series.xaxis.options.categories = jQuery.map(data, function (point) { return point[0]; });
        }
        if (series.bars.show && series.bars.order != null) {
            series.esmflash_bar_order = series.bars.order;
            series.bars.order = null;
        }
    }
    function shift_category_bars(plot, series, datapoints) {
        if (series.esmflash_bar_order === undefined) {
            return;
        }
        var orders = jQuery.map(plot.getData(), function (s) { return s.esmflash_bar_order; });
        orders.sort(function (a, b) { return a - b; });
        var shift = (orders.indexOf(series.esmflash_bar_order) - (orders.length - 1) / 2) * series.bars.barWidth;
        for (var i = 0; i < datapoints.points.length; i += datapoints.pointsize) {
            if (datapoints.points[i] !== null) {
                datapoints.points[i] += shift;
            }
        }
    }

    if (window.jQuery && jQuery.plot) {
        jQuery.plot.plugins.push({
            name: 'esmflash', version: '1.0', options: {},
            init: function (plot) {
                plot.hooks.processOptions.push(html_axis_labels);
                plot.hooks.processRawData.push(prepare_category_series);
                plot.hooks.processDatapoints.push(shift_category_bars);
            }
        });
    }
})();
